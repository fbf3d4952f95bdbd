"""shoal: Ray Serve's API and behaviour on one machine, without Ray.

Port a Ray Serve app by replacing ``ray`` with ``shoal`` in its imports: ``from shoal import serve``.
"""

__version__ = "0.1.0"
