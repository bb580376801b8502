"""User text (CSV headers, labels, file, dataset and run names, stored error messages) is shown as text, never as
markdown: Streamlit renders markdown in st.error / st.caption / st.metric labels and so on, where ``![x](http://…)``
would load an external image and ``:red[...]`` or ``[link](…)`` would change the page. :func:`plain` escapes it."""
from __future__ import annotations

import re

# every character Streamlit's markdown (CommonMark + GFM + its :color[]/:material: directives) gives a meaning
_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$=&])")


def plain(text: object) -> str:
    """``text`` with every markdown character backslash-escaped (and newlines kept as line breaks)."""
    s = _SPECIAL.sub(r"\\\1", str(text))
    return s.replace("\n", "  \n")
