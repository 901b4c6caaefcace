"""The controller's read-only web page (``[web]`` in the controller's configuration; off by default).

:mod:`controller.web.server` serves it on the controller's event loop (aiohttp), :mod:`controller.web.view`
turns the consolidated state into what the page shows, :mod:`controller.web.history` keeps the plots'
last hour in a fixed ring, and ``static/`` holds the page itself (HTML, JS, CSS; nothing from a CDN).
"""

from controller.web.server import WebPage, WebServerError, WebStats

__all__ = ["WebPage", "WebServerError", "WebStats"]
