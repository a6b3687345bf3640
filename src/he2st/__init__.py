"""he2st: predict spatially resolved gene expression from H&E histology.

The public API re-exports the objects most users touch; everything else lives in the
sub-packages (``he2st.data``, ``he2st.encoders``, ``he2st.methods``, ``he2st.evaluate``).
"""

from he2st.errors import He2stError

__version__ = "0.1.0"

__all__ = ["He2stError", "__version__"]
