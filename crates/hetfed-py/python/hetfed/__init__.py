"""hetfed from Python: the native bindings (`hetfed.hetfed`, PyO3) re-exported at the top level,
and `hetfed.flower`, hetfed's heterogeneous federation on Flower (imported on demand: it needs
`flwr`)."""

from .hetfed import *  # noqa: F401,F403
from .hetfed import HetfedError, __version__  # noqa: F401
