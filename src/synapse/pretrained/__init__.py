"""Methods on pretrained backbones: closed-form classifiers on frozen features (SimpleCIL, RanPAC) and
prompts learned for a frozen ViT (L2P, DualPrompt, CODA-Prompt; :mod:`synapse.pretrained._prompt` injects them).

The user builds the backbone (e.g. ``timm.create_model(...)`` with their own local weights) and the method
on it; the method reads the feature/head split from the model (:mod:`synapse.pretrained._backbone`), so
any timm ViT or ResNet, or any model whose last layer is an ``nn.Linear``, works.
"""

from .coda_prompt import CODAPrompt
from .dualprompt import DualPrompt
from .l2p import L2P
from .ranpac import RanPAC
from .simplecil import SimpleCIL

__all__ = ["SimpleCIL", "RanPAC", "L2P", "DualPrompt", "CODAPrompt"]
