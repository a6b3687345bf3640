"""The registered methods, one module per family (``@register_method`` classes; their options live in
:mod:`he2st.methods.configs`, their shared parts in :mod:`he2st.methods.layers`)."""
