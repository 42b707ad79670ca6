"""One-time codes: generation, normalisation, keyed digests and sealed copies.

Security contract (SECURITY.md S1–S3, S5):

* codes come from :mod:`secrets`, never :mod:`random`;
* a code is stored only as ``HMAC-SHA256(key, verification id ‖ code ‖ canonical context)``; the key
  lives outside the database, so a stolen database alone cannot be brute-forced offline;
* the only reversible copy is sealed with AES-256-GCM (key outside the database, the
  verification id as associated data, so a ciphertext cannot be moved to another row) and exists
  only so that a resend can send the *same* code; storage erases it when the verification leaves
  ``pending``;
* comparison is constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import unicodedata
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from otpgate.domain.ascii import ascii_upper
from otpgate.domain.model import CodeType
from otpgate.errors import InvalidRequest

NUMERIC_ALPHABET = "0123456789"
#: Upper-case letters and digits without the look-alikes 0/O and 1/I (API.md §3).
ALPHANUMERIC_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"

MIN_CODE_LENGTH = 4
MAX_CODE_LENGTH = 10
#: The longest string a check may present; anything longer is refused before hashing.
MAX_PRESENTED_CODE_LENGTH = 64

_NONCE_BYTES = 12


def alphabet_for(code_type: CodeType) -> str:
    return NUMERIC_ALPHABET if code_type is CodeType.NUMERIC else ALPHANUMERIC_ALPHABET


def generate_code(length: int, code_type: CodeType = CodeType.NUMERIC) -> str:
    """A code of ``length`` characters drawn uniformly from the type's alphabet.

    >>> len(generate_code(6)), generate_code(8).isdigit()
    (6, True)
    """
    if not MIN_CODE_LENGTH <= length <= MAX_CODE_LENGTH:
        raise InvalidRequest("code_length must be 4 to 10", param="code_length")
    alphabet = alphabet_for(code_type)
    return "".join(secrets.choice(alphabet) for _ in range(length))


#: Unicode categories dropped from a presented code: spaces of any width (Zs, which includes
#: the no-break and thin spaces), line and paragraph separators, invisible format characters
#: (Cf: zero-width spaces and joiners, the byte-order mark) and dashes of any kind (Pd).
_DROPPED_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cf", "Pd"})
#: Dropped too: the whitespace controls, and the minus signs, which Unicode files as maths.
_DROPPED = frozenset("\t\n\v\f\r\u2212\u207b\u208b")
#: The full-width forms of ASCII's printable characters (U+FF01–U+FF5E), as a phone keyboard in
#: a CJK input mode types them, and how far they sit from their ASCII counterparts.
_FULL_WIDTH_FIRST, _FULL_WIDTH_LAST, _FULL_WIDTH_OFFSET = "\uff01", "\uff5e", 0xFEE0
#: Every character a code of any service can hold, once normalised.
_ANY_CODE_CHARACTER = frozenset(NUMERIC_ALPHABET) | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def normalize_code(presented: str, code_type: CodeType) -> str:
    """The code as the user meant it: digits of any script as ASCII digits, full-width forms
    as their ASCII letters and signs, spaces, dashes and invisible characters of any kind
    dropped, alphanumeric codes upper-cased. Nothing else is folded: a superscript or circled
    digit, a Roman numeral or a ligature stays what it is (and ``presented_code`` refuses it).

    >>> normalize_code(" 123-456 ", CodeType.NUMERIC)
    '123456'
    >>> normalize_code("ab2 c-d", CodeType.ALPHANUMERIC)
    'AB2CD'
    >>> normalize_code("٤٠٧\u00a0٢١٥", CodeType.NUMERIC)  # Arabic-Indic, a no-break space
    '407215'
    >>> normalize_code("４０７–２１５", CodeType.NUMERIC)  # full-width, an en dash
    '407215'
    >>> normalize_code("²²⁹①", CodeType.NUMERIC)  # superscript and circled: not digits
    '²²⁹①'
    >>> normalize_code("ab-ﬁß", CodeType.ALPHANUMERIC)  # a ligature and ß stay themselves
    'ABﬁß'
    """
    kept: list[str] = []
    for ch in presented:
        if _FULL_WIDTH_FIRST <= ch <= _FULL_WIDTH_LAST:
            ch = chr(ord(ch) - _FULL_WIDTH_OFFSET)
        digit = unicodedata.decimal(ch, None)
        if digit is not None:
            kept.append(NUMERIC_ALPHABET[digit])
        elif ch not in _DROPPED and unicodedata.category(ch) not in _DROPPED_CATEGORIES:
            kept.append(ch)
    cleaned = "".join(kept)
    # ASCII letters only: str.upper() would turn "ß" into "SS", "ﬁ" into "FI", "ı" into "I".
    return ascii_upper(cleaned) if code_type is CodeType.ALPHANUMERIC else cleaned


def presented_code(presented: Any) -> str:
    """A code as presented to a check, normalised (upper-cased, which is harmless for numeric
    codes), or ``InvalidRequest`` naming ``code`` when it cannot be the code of any service.

    Refused, so that no attempt is counted for them: a non-string, more than
    :data:`MAX_PRESENTED_CODE_LENGTH` characters as sent, nothing left once spaces and dashes
    are dropped, a character that is neither a digit (of any script) nor a letter A–Z, or a
    length no service uses. A code of the right alphabet but the wrong length or letters for
    this service is an ordinary wrong code: only the check, not the presented text, can tell.

    >>> presented_code(" ab2-cd ")
    'AB2CD'
    >>> presented_code("٤٠٧ ٢١٥")
    '407215'
    """
    if not isinstance(presented, str):
        raise InvalidRequest("code must be a string", param="code")
    if len(presented) > MAX_PRESENTED_CODE_LENGTH:
        raise InvalidRequest(
            f"code must be at most {MAX_PRESENTED_CODE_LENGTH} characters", param="code"
        )
    normalized = normalize_code(presented, CodeType.ALPHANUMERIC)
    if not normalized:
        raise InvalidRequest(
            "code holds no digits or letters once spaces and dashes are dropped", param="code"
        )
    if not set(normalized) <= _ANY_CODE_CHARACTER:
        raise InvalidRequest(
            "code may hold only digits (of any script), letters A–Z, spaces and dashes",
            param="code",
        )
    if not MIN_CODE_LENGTH <= len(normalized) <= MAX_CODE_LENGTH:
        raise InvalidRequest(
            f"a code has {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH} digits or letters; this one has"
            f" {len(normalized)}",
            param="code",
        )
    return normalized


def validate_custom_code(code: str, *, length: int, code_type: CodeType) -> str:
    """An integrator-chosen code, normalised, or ``InvalidRequest`` naming ``custom_code``."""
    normalized = normalize_code(code, code_type)
    alphabet = alphabet_for(code_type)
    if len(normalized) != length or any(ch not in alphabet for ch in normalized):
        kind = "digits" if code_type is CodeType.NUMERIC else f"characters of {alphabet}"
        raise InvalidRequest(
            f"custom_code must be {length} {kind}, as the service's code rules say",
            param="custom_code",
        )
    return normalized


def canonical_context(context: Mapping[str, str] | None) -> str:
    """A byte-stable rendering of a transaction context, so the same values always hash alike.

    >>> canonical_context({"payee": "Shop", "amount": "1.00"})
    '{"amount":"1.00","payee":"Shop"}'
    >>> canonical_context(None)
    ''
    """
    if not context:
        return ""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class CodeVault:
    """Keyed digests and sealed copies of codes. Holds the two keys; never persists anything.

    ``digest_key`` keys the HMAC; ``sealing_key`` (32 bytes) keys AES-256-GCM.
    """

    __slots__ = ("_aead", "_digest_key")

    def __init__(self, *, digest_key: bytes, sealing_key: bytes) -> None:
        if len(digest_key) < 32 or len(sealing_key) != 32:
            raise ValueError("digest_key needs at least 32 bytes and sealing_key exactly 32")
        self._digest_key = digest_key
        self._aead = AESGCM(sealing_key)

    def __repr__(self) -> str:
        return "CodeVault(<keys hidden>)"

    def digest(
        self, verification_id: str, code: str, context: Mapping[str, str] | None = None
    ) -> bytes:
        """HMAC-SHA256 over the verification id, the normalised code and the canonical context.

        Fields are joined with NUL, which appears in none of them, so no two different
        triples can produce the same input.
        """
        message = "\x00".join((verification_id, code, canonical_context(context))).encode()
        return hmac.new(self._digest_key, message, hashlib.sha256).digest()

    def matches(
        self,
        stored_digest: bytes,
        verification_id: str,
        presented: str,
        context: Mapping[str, str] | None = None,
    ) -> bool:
        """True when ``presented`` (already normalised) is the code, compared in constant time."""
        return hmac.compare_digest(stored_digest, self.digest(verification_id, presented, context))

    def seal(self, verification_id: str, code: str) -> bytes:
        """AES-GCM ciphertext of the code, bound to its verification id: nonce ‖ ciphertext."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, code.encode(), verification_id.encode())

    def unseal(self, verification_id: str, sealed: bytes) -> str:
        """The code back from :meth:`seal`; ``ValueError`` if it was altered or moved."""
        try:
            plain = self._aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], verification_id.encode()
            )
        except InvalidTag as exc:
            raise ValueError("sealed code does not authenticate") from exc
        return plain.decode()
