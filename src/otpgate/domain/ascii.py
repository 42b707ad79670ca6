"""Upper-casing for identifiers people type: codes and country codes.

``str.upper()`` follows Unicode's full case mapping, which turns one character into others
("ß" into "SS", the ligature "ﬁ" into "FI", the dotless "ı" into "I"), so a string that is no
country code or code at all could become one (``"ß"`` → South Sudan's ``"SS"``). These
identifiers are ASCII: only ASCII letters are upper-cased, and anything else stays itself, to
be refused by the check that follows.
"""

from __future__ import annotations

import string

_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def ascii_upper(text: str) -> str:
    """``text`` with its ASCII letters upper-cased and every other character unchanged.

    >>> ascii_upper("es"), ascii_upper("ß"), ascii_upper("ﬁ1")
    ('ES', 'ß', 'ﬁ1')
    """
    return text.translate(_ASCII_UPPER)
