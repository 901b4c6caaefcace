"""bmslink: rack agents, cluster controllers and their tools.

``__version__`` has one source, the ``version`` of pyproject.toml, read from the installed package's
metadata (``importlib.metadata``): what ``bmslink --version`` prints and what the metrics endpoints
carry as ``bmslink_build_info{version}``. A source tree that was never installed has no metadata
and says ``0+unknown`` (a PEP 440 local version, so tools that compare versions still parse it).
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "bmslink"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:
    __version__ = "0+unknown"

__all__ = ["DISTRIBUTION", "__version__"]
