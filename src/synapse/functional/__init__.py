"""Pure functions behind the methods: sampling, losses, penalties and projections.

Each is tested against hand computations, and none synchronises host and device, so they are safe in
the hot path of ``backward``. One module per kind; every public name is re-exported here, so
``from synapse.functional import project_conflicting_`` works whichever module holds it.
"""

from .coda import *  # noqa: F403
from .coda import __all__ as _coda
from .distillation import *  # noqa: F403
from .distillation import __all__ as _distillation
from .penalties import *  # noqa: F403
from .penalties import __all__ as _penalties
from .projection import *  # noqa: F403
from .projection import __all__ as _projection
from .prompts import *  # noqa: F403
from .prompts import __all__ as _prompts
from .replay import *  # noqa: F403
from .replay import __all__ as _replay
from .sampling import *  # noqa: F403
from .sampling import __all__ as _sampling

__all__ = [*_sampling, *_replay, *_projection, *_penalties, *_distillation, *_coda, *_prompts]
