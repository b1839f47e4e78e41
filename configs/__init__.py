"""The shipped sweep configs (`medvqa demo` presets, cluster recipes) and accelerate configs.

Installed as package data of `medvqa.configs`, so a wheel install finds them: read them through
`importlib.resources.files("medvqa.configs")`, never through a path beside the source tree.
"""
