"""Streamlit-side helpers shared by the pages (the only package besides app_pages/ and app.py that imports streamlit)."""
