"""Benchmark caches serve a run only while today's code resolves its row to the configuration the run had."""

import dataclasses
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _runner  # noqa: E402
import protocols  # noqa: E402
from synapse import catalog  # noqa: E402
from synapse.experiments.config import Config  # noqa: E402

ROW = ("perm-mnist", "er", 200)


def test_same_config_counts_only_the_same_resolution():
    today = {"lr": 0.1, "method_args": {"mb": 128}, "unfused": False}
    assert _runner.same_config(dict(today), today)
    assert not _runner.same_config(None, today)  # recorded nothing: never served
    assert not _runner.same_config({**today, "lr": 0.2}, today)
    assert not _runner.same_config({**today, "method_args": {"mb": 64}}, today)
    assert not _runner.same_config({**today, "removed_since": 1}, today)


def test_a_setting_added_since_the_entry_counts_only_at_its_default():
    assert Config().unfused is False  # the field this test leans on, and its default
    recorded = {"lr": 0.1}
    assert _runner.same_config(recorded, {"lr": 0.1, "unfused": False})
    assert not _runner.same_config(recorded, {"lr": 0.1, "unfused": True})


def test_resolved_config_fills_catalog_defaults_and_names_weights_by_content(tmp_path):
    cfg = _runner.config_for("fashion-mnist", "mas", None, 0, hp={"lr": 0.1})
    resolved = _runner.resolved_config(cfg)
    assert resolved["method_args"]["mas_lambda"] == catalog.get("mas").defaults()["mas_lambda"]
    json.dumps(resolved)  # a cache line holds it as it is

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"first")
    first = _runner.file_sha256(str(weights))
    weights.write_bytes(b"second version")  # another size: read again, not served from the memo
    assert _runner.file_sha256(str(weights)) != first


def _entry(config):
    protocol, method, buffer = ROW
    return {"protocol": protocol, "method": method, "buffer": buffer, "seed": 0, "overrides": {},
            "config": config, "result": {"average_accuracy": {"class_il": 0.5}}}  # fmt: skip


def _served(tmp_path, entry):
    cache = tmp_path / "runs.jsonl"
    cache.write_text(json.dumps(entry) + "\n")
    _, done = protocols.cached_runs(str(cache), ROW[0], [ROW[1:]], [0], False, {})
    return done


def test_a_protocol_run_is_served_while_its_row_resolves_the_same(tmp_path):
    config = protocols.row_config(*ROW, 0, False, {})
    assert _served(tmp_path, _entry(config)) == {(*ROW[1:], 0)}
    assert _served(tmp_path, {k: v for k, v in _entry(config).items() if k != "config"}) == set()
    assert _served(tmp_path, {**_entry(config), "tuned": {"lr": 0.1}}) == set()  # a second row's run


def test_a_changed_preset_or_catalog_default_runs_the_row_again(tmp_path, monkeypatch):
    entry = _entry(protocols.row_config(*ROW, 0, False, {}))
    preset = protocols.BEST[ROW[0]][ROW[1:]]
    monkeypatch.setitem(protocols.BEST[ROW[0]], ROW[1:], {**preset, "lr": preset["lr"] / 2})
    assert _served(tmp_path, entry) == set()
    monkeypatch.setitem(protocols.BEST[ROW[0]], ROW[1:], preset)
    assert _served(tmp_path, entry) == {(*ROW[1:], 0)}

    # A default the preset does not set, changed in the method's catalog entry.
    spec = catalog.get(ROW[1])
    unset = [h for h in spec.hparams if h.name not in preset and isinstance(h.default, (int, float))]
    if not unset:
        pytest.skip("the preset sets every numeric value of the method")
    changed = dataclasses.replace(unset[0], default=unset[0].default * 2 + 1)
    hparams = tuple(changed if h.name == changed.name else h for h in spec.hparams)
    monkeypatch.setitem(catalog._REGISTRY, ROW[1], dataclasses.replace(spec, hparams=hparams))
    assert _served(tmp_path, entry) == set()


def test_a_crosscheck_run_is_served_while_its_rows_resolve_the_same(tmp_path, monkeypatch):
    import crosscheck

    check = "mir-200"
    entry = {"check": check, "side": 0, "seed": 0, "value": {"final": 50.0}, "provenance": None,
             "configs": crosscheck.check_configs(check, 0)}  # fmt: skip
    cache = tmp_path / "runs.jsonl"
    cache.write_text(json.dumps(entry) + "\n")
    assert (check, 0, 0) in crosscheck._load_cache(str(cache))[0]

    real = _runner.presets.values  # the preset's lr changes: the run no longer counts
    changed = lambda *args, **kwargs: {**real(*args, **kwargs), "lr": 0.123}  # noqa: E731
    monkeypatch.setattr(_runner.presets, "values", changed)
    assert crosscheck._load_cache(str(cache))[0] == {}


def test_a_vision_run_is_shown_while_its_row_resolves_the_same(monkeypatch):
    import vision_fmnist

    key = ("resnet18-reduced", True, 0)
    entry = {"model": key[0], "replay_augment": key[1], "seed": key[2],
             "config": _runner.resolved_config(vision_fmnist.config(*key))}  # fmt: skip
    assert vision_fmnist.current([entry]) == [entry]
    assert vision_fmnist.current([{k: v for k, v in entry.items() if k != "config"}]) == []  # recorded nothing

    real = vision_fmnist.config  # the row's buffer changes: the held run no longer counts
    monkeypatch.setattr(vision_fmnist, "config", lambda *k: dataclasses.replace(real(*k), buffer_size=200))
    assert vision_fmnist.current([entry]) == []


def test_a_crosscheck_run_records_its_wall_time_in_the_cache(tmp_path, monkeypatch, capsys):
    import crosscheck

    made = [(("derpp-steps", 0, crosscheck.STEPS_SEED), (36, 0.5), 12.345, {"commit": "abc"})]
    monkeypatch.setattr(crosscheck, "run_jobs", lambda fn, jobs, workers: iter(made))
    monkeypatch.setattr(crosscheck, "render", lambda *args: "page")
    monkeypatch.setattr(crosscheck, "summary_checks", lambda results: None)
    monkeypatch.setattr(crosscheck.crosscheck_summary, "render", lambda *args: "summary")
    cache = tmp_path / "runs.jsonl"
    assert crosscheck.main(["--checks", "derpp-steps", "--cache", str(cache), "--output", "-"]) == 0
    (entry,) = [json.loads(line) for line in cache.read_text().splitlines()]
    assert entry["seconds"] == 12.3 and entry["value"] == [36, 0.5] and entry["provenance"] == {"commit": "abc"}
