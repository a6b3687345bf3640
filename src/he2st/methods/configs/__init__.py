"""Every method's options, one pydantic model per method, in modules that import neither torch nor the
methods themselves: ``he2st methods``, the option tables of ``docs/methods/`` and config validation read
them without loading a model. Each method's module imports its options from here."""
