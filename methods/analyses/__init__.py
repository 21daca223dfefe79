"""Built-in analyses. Importing this package registers them."""

from methods.analyses import shape_bias as _shape_bias  # noqa: F401
from methods.analyses import splits as _splits  # noqa: F401
