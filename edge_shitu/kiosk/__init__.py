"""Kiosk mode: a local recognition service with a browser UI (``edge-shitu serve``, the ``kiosk`` extra).

:mod:`edge_shitu.kiosk.service` is what the kiosk does, without HTTP; :mod:`edge_shitu.kiosk.app` the
Starlette application over it; :mod:`edge_shitu.kiosk.security` the token, Host and origin checks;
``static/`` the browser UI. The contract of the HTTP API is docs/kiosk.md.
"""
