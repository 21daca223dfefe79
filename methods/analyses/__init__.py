"""Built-in analyses. Importing this package registers them."""

from methods.analyses import calibration as _calibration  # noqa: F401
from methods.analyses import lmc_barrier as _lmc_barrier  # noqa: F401
from methods.analyses import representation_r2 as _representation_r2  # noqa: F401
from methods.analyses import shape_bias as _shape_bias  # noqa: F401
from methods.analyses import splits as _splits  # noqa: F401
from methods.analyses import subnetwork_ablation as _subnetwork_ablation  # noqa: F401
