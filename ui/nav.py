"""Keep every page inside app.py's navigation.

``app.py`` builds the navigation with ``st.navigation``. Because the page scripts live in a folder named ``pages/``,
Streamlit starts every server process in its older folder-based multipage mode, which ``st.navigation`` only
switches off once app.py has run. So when the first request after a server start is a deep link (a bookmarked
``/runs``), Streamlit runs ``pages/runs.py`` by itself, with a menu built from the file names and without app.py's
sidebar. :func:`through_app`, called at the top of every page, notices that case and reruns: the rerun goes through
app.py, which shows the same page (page ids come from the URL path in both modes) inside the real navigation.
"""
from __future__ import annotations

import streamlit as st


def _under_apptest() -> bool:
    """``streamlit.testing.v1.AppTest`` runs scripts on a mocked runtime and resets the folder-mode flag before every
    run, so there a rerun would only repeat the run (and drop the widget values the test set); leave it alone."""
    from streamlit.runtime import Runtime

    return type(getattr(Runtime, "_instance", None)).__module__.startswith("unittest.mock")


def through_app() -> None:
    """Rerun through app.py when Streamlit ran this page script in its folder-based mode (see the module doc)."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory and not _under_apptest():
        PagesManager.uses_pages_directory = False  # what st.navigation in app.py would have set
        st.rerun()
