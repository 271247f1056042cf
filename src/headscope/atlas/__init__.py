"""The head atlas: a static web page over a run directory, and a server with a live prompt box.

* :mod:`.collect` gathers what every instrument knows about each head (``atlas_data`` of each package).
* :mod:`.build` writes the site into ``RUN/atlas/``: ``index.html``, static assets and data pages as
  JavaScript files (``window.__atlas_page(key, data)``) so that it opens from disk (``file://``).
* :mod:`.server` serves only that folder on 127.0.0.1 and answers live-prompt requests (:mod:`.live`).
"""
