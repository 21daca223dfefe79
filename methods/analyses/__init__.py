"""Built-in analyses. Importing this package registers them."""

from methods.analyses import lmc_barrier as _lmc_barrier  # noqa: F401
from methods.analyses import shape_bias as _shape_bias  # noqa: F401
from methods.analyses import splits as _splits  # noqa: F401
from methods.analyses import subnetwork_ablation as _subnetwork_ablation  # noqa: F401
