"""The web console: a static single-page app (static/), its session API and its router
(routes.py: `console_router()`), and the session cookie and CSRF checks (sessions.py)."""
