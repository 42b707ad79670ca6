"""The SMPP provider against an SMSC otpgate did not write: node-smpp's server side
(npm ``smpp``, driven by ``tests/node/smsc.mjs``) on a free loopback port.

The shared sender contract first, then what SMPP adds: data_coding and the text the SMSC
decodes, TON/NPI by sender type, UDH parts, statuses, the window, timeouts, receipts,
reconnection, bind failures and the URL's validation.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from otpgate.adapters.providers.smpp import SmppSender, parse_receipt, split_text
from otpgate.bootstrap import build_sender
from otpgate.domain.model import MessageStatus
from otpgate.domain.ports import DeliveryReport
from otpgate.errors import (
    ConfigurationError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from otpgate.settings import Settings
from tests.contract.sender_contract import (
    OTHER_ID,
    TEXT,
    SenderCase,
    SenderContract,
    assert_no_secret,
    make_sms,
)
from tests.support.smsc import Smsc, free_port, smsc_missing

_missing = smsc_missing()
if _missing is not None and os.environ.get("CI"):
    # CI installs node-smpp (.ci/run, make install-node): a missing one is a broken set-up.
    raise RuntimeError(_missing)
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

PASSWORD = "s3cr3t"
GREEK = "Ο κωδικός σας είναι 845201"
RUSSIAN = "Ваш код подтверждения: 845201"


@pytest.fixture(scope="module")
def smsc_server() -> Iterator[Smsc]:
    with Smsc(password=PASSWORD) as smsc:
        yield smsc


@pytest.fixture
def smsc(smsc_server: Smsc) -> Iterator[Smsc]:
    smsc_server.refuse_binds(False)
    smsc_server.receipts(enabled=True, stat="DELIVRD", err="000", tlvs=True, delay_ms=20)
    smsc_server.clear()
    yield smsc_server
    smsc_server.throttle(0)
    smsc_server.silence(0)
    smsc_server.refuse(0, 0)
    smsc_server.refuse_binds(False)


def make_sender(smsc: Smsc, **options: object) -> SmppSender:
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": smsc.port,
        "system_id": smsc.system_id,
        "password": smsc.password,
        "timeout_seconds": 5.0,
        "backoff_seconds": (0.05, 0.2),
    }
    settings.update(options)
    return SmppSender(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def sender(smsc: Smsc) -> AsyncIterator[SmppSender]:
    sender = make_sender(smsc)
    yield sender
    await sender.aclose()


@pytest.fixture
async def case(smsc: Smsc) -> AsyncIterator[SenderCase]:
    sender = make_sender(smsc)
    yield SenderCase(
        sender=sender,
        secrets=(PASSWORD,),
        delivered_texts=lambda: [r["text"] for r in smsc.accepted()],
        break_next_send=lambda: smsc.throttle(1),
        break_check=lambda: smsc.refuse_binds(True),
    )
    await sender.aclose()


class TestContract(SenderContract):
    """The shared contract, against node-smpp's SMSC."""


# --------------------------------------------------------------------------------------------
# What reaches the SMSC


async def test_gsm7_text_goes_as_data_coding_0_and_reads_back(
    smsc: Smsc, sender: SmppSender
) -> None:
    text = "Code 845201: {Acme} costs 5€ [ok] ~ ^ | \\ àèéùìò ÄÖÑÜ"
    await sender.send(make_sms(text=text))

    (submit,) = smsc.accepted()
    assert submit["data_coding"] == 0
    assert submit["esm_class"] == 0
    assert submit["registered_delivery"] == 1
    assert submit["text"] == text  # node-smpp decodes GSM 03.38, one septet per octet
    # unpacked septets, escapes for the extension table: '€' is 1B 65
    assert "1b65" in submit["raw_hex"]


@pytest.mark.parametrize("text", [GREEK, RUSSIAN])
async def test_greek_and_russian_go_as_ucs2(smsc: Smsc, sender: SmppSender, text: str) -> None:
    await sender.send(make_sms(text=text, encoding="UCS-2"))

    (submit,) = smsc.accepted()
    assert submit["data_coding"] == 8
    assert submit["text"] == text
    assert text.encode("utf-16-be").hex() in submit["raw_hex"]


async def test_a_text_outside_gsm7_goes_as_ucs2_even_if_measured_otherwise(
    smsc: Smsc, sender: SmppSender
) -> None:
    await sender.send(make_sms(text=RUSSIAN, encoding="GSM-7"))

    (submit,) = smsc.accepted()
    assert (submit["data_coding"], submit["text"]) == (8, RUSSIAN)


@pytest.mark.parametrize(
    ("sender_id", "address", "ton", "npi"),
    [
        ("Acme", "Acme", 5, 0),
        ("Acme Bank", "Acme Bank", 5, 0),
        ("12345", "12345", 3, 0),
        ("12345678", "12345678", 3, 0),
        ("123456789", "123456789", 1, 1),
        ("+34911234567", "34911234567", 1, 1),
    ],
)
async def test_source_ton_npi_by_sender_type_and_destination_international(
    smsc: Smsc, sender: SmppSender, sender_id: str, address: str, ton: int, npi: int
) -> None:
    await sender.send(make_sms(sender_id=sender_id, to="+34600123456"))

    (submit,) = smsc.accepted()
    assert (submit["source_addr"], submit["source_addr_ton"], submit["source_addr_npi"]) == (
        address,
        ton,
        npi,
    )
    assert (submit["destination_addr"], submit["dest_addr_ton"], submit["dest_addr_npi"]) == (
        "34600123456",
        1,
        1,
    )


async def test_the_url_source_and_its_ton_npi_apply_when_set(smsc: Smsc) -> None:
    sender = build_sender(
        Settings(
            sms_provider="smpp",
            smpp_url=smsc.url("source=Fallback&source_ton=2&source_npi=8"),  # type: ignore[arg-type]
        )
    )
    try:
        await sender.send(make_sms(sender_id=None))
    finally:
        await sender.aclose()

    (submit,) = smsc.accepted()
    assert (submit["source_addr"], submit["source_addr_ton"], submit["source_addr_npi"]) == (
        "Fallback",
        2,
        8,
    )


async def test_a_long_gsm7_message_goes_in_udh_parts(smsc: Smsc, sender: SmppSender) -> None:
    text = "a" * 152 + "€" + "b" * 100  # the escape pair would straddle septet 153
    receipt = await sender.send(make_sms(text=text, segments=2))

    parts = smsc.accepted()
    assert len(parts) == 2
    assert {p["esm_class"] & 0x40 for p in parts} == {0x40}
    assert {p["data_coding"] for p in parts} == {0}
    udh = [bytes.fromhex(p["udh"][0]) for p in parts]  # IE id, length, ref, total, seq
    assert [u[:2] for u in udh] == [b"\x00\x03", b"\x00\x03"]
    assert udh[0][2] == udh[1][2]
    assert [(u[3], u[4]) for u in udh] == [(2, 1), (2, 2)]
    assert parts[0]["text"] == "a" * 152
    assert parts[0]["text"] + parts[1]["text"] == text
    assert receipt.provider_ref == parts[0]["message_id"]


async def test_a_long_ucs2_message_goes_in_parts_of_67_units(
    smsc: Smsc, sender: SmppSender
) -> None:
    text = RUSSIAN * 5  # 145 units
    await sender.send(make_sms(text=text, encoding="UCS-2", segments=3))

    parts = smsc.accepted()
    assert [len(p["text"]) for p in parts] == [67, 67, 11]
    assert {p["data_coding"] for p in parts} == {8}
    assert "".join(p["text"] for p in parts) == text
    assert [bytes.fromhex(p["udh"][0])[3:] for p in parts] == [
        b"\x03\x01",
        b"\x03\x02",
        b"\x03\x03",
    ]


def test_split_never_breaks_a_surrogate_pair() -> None:
    text = "a" * 66 + "😀" + "b" * 10
    parts = split_text(text, "UCS-2", 7)
    assert [p.text for p in parts] == ["a" * 66, "😀" + "b" * 10]
    assert all(p.payload[:6] == bytes([5, 0, 3, 7, 2, i + 1]) for i, p in enumerate(parts))


def test_one_part_has_no_udh() -> None:
    (gsm,) = split_text("a" * 160, "GSM-7", 1)
    (ucs,) = split_text("Ж" * 70, "UCS-2", 1)
    assert (gsm.esm_class, gsm.data_coding, len(gsm.payload)) == (0, 0, 160)
    assert (ucs.esm_class, ucs.data_coding, len(ucs.payload)) == (0, 8, 140)
    assert len(split_text("a" * 161, "GSM-7", 1)) == 2
    assert len(split_text("Ж" * 71, "UCS-2", 1)) == 2


# --------------------------------------------------------------------------------------------
# Answers: statuses, silence, the window


@pytest.mark.parametrize("status", [0x58, 0x14, 0x08])
async def test_throttling_queue_full_and_system_errors_are_transient(
    smsc: Smsc, sender: SmppSender, status: int
) -> None:
    smsc.refuse(1, status)

    with pytest.raises(TransientDeliveryError) as info:
        await sender.send(make_sms())

    assert not isinstance(info.value, DeliveryTimeout)
    assert f"0x{status:08X}" in str(info.value)
    assert_no_secret(info.value, PASSWORD)
    assert (await sender.send(make_sms())).provider_ref  # the bind is still good


@pytest.mark.parametrize("status", [0x0B, 0x50, 0x01])
async def test_an_invalid_destination_or_message_is_permanent(
    smsc: Smsc, sender: SmppSender, status: int
) -> None:
    smsc.refuse(1, status)

    with pytest.raises(PermanentDeliveryError) as info:
        await sender.send(make_sms())

    assert f"0x{status:08X}" in str(info.value)
    assert_no_secret(info.value, PASSWORD)


async def test_a_submit_without_an_answer_is_a_delivery_timeout(smsc: Smsc) -> None:
    sender = make_sender(smsc, timeout_seconds=0.5)
    smsc.silence(1)
    try:
        with pytest.raises(DeliveryTimeout) as info:
            await sender.send(make_sms())
        assert_no_secret(info.value, PASSWORD)
        assert (await sender.send(make_sms(message_id=OTHER_ID))).provider_ref
    finally:
        await sender.aclose()
    assert [r["resp_status"] for r in smsc.submits()] == [None, 0]


async def test_the_window_bounds_the_outstanding_submits(smsc: Smsc) -> None:
    sender = make_sender(smsc, window=2, timeout_seconds=1.0)
    smsc.silence(3)
    try:
        results = await asyncio.gather(
            *(sender.send(make_sms(message_id=f"msg_{i:032x}")) for i in range(3)),
            return_exceptions=True,
        )
    finally:
        await sender.aclose()
    kinds = sorted(type(r).__name__ for r in results)
    # two went out and got no answer; the third never left: the window stayed full
    assert kinds == ["DeliveryTimeout", "DeliveryTimeout", "TransientDeliveryError"]
    smsc.sync()
    assert len(smsc.submits()) == 2


async def test_window_default_lets_ten_submits_be_outstanding(smsc: Smsc) -> None:
    sender = make_sender(smsc, timeout_seconds=1.0)
    smsc.silence(10)
    try:
        results = await asyncio.gather(
            *(sender.send(make_sms(message_id=f"msg_{i:032x}")) for i in range(10)),
            return_exceptions=True,
        )
    finally:
        await sender.aclose()
    assert all(isinstance(r, DeliveryTimeout) for r in results)
    smsc.sync()
    assert len(smsc.submits()) == 10


# --------------------------------------------------------------------------------------------
# Receipts


async def test_a_receipt_is_pushed_as_delivered_with_the_submit_message_id(
    smsc: Smsc, sender: SmppSender
) -> None:
    reports: asyncio.Queue[DeliveryReport] = asyncio.Queue()

    async def sink(report: DeliveryReport) -> None:
        await reports.put(report)

    sender.report_to(sink)
    receipt = await sender.send(make_sms())

    report = await asyncio.wait_for(reports.get(), 5)
    assert report == DeliveryReport(receipt.provider_ref or "", MessageStatus.DELIVERED, "DELIVRD")
    await smsc.wait_for_count_async("deliver_sm_resp", 1)
    assert smsc.records("deliver_sm_resp")[0]["command_status"] == 0


@pytest.mark.parametrize("tlvs", [True, False])
async def test_an_undelivered_receipt_from_text_or_tlvs(
    smsc: Smsc, sender: SmppSender, tlvs: bool
) -> None:
    smsc.receipts(stat="UNDELIV", err="001", tlvs=tlvs)
    reports: asyncio.Queue[DeliveryReport] = asyncio.Queue()

    async def sink(report: DeliveryReport) -> None:
        await reports.put(report)

    sender.report_to(sink)
    receipt = await sender.send(make_sms())

    report = await asyncio.wait_for(reports.get(), 5)
    assert report.provider_ref == receipt.provider_ref
    assert report.status is MessageStatus.UNDELIVERED


async def test_a_long_message_gets_one_report_when_every_part_is_delivered(
    smsc: Smsc, sender: SmppSender
) -> None:
    reports: list[DeliveryReport] = []

    async def sink(report: DeliveryReport) -> None:
        reports.append(report)

    sender.report_to(sink)
    receipt = await sender.send(make_sms(text="x" * 400, segments=3))

    await smsc.wait_for_count_async("deliver_sm_resp", 3)
    assert reports == [
        DeliveryReport(receipt.provider_ref or "", MessageStatus.DELIVERED, "DELIVRD")
    ]


async def test_a_receipt_the_sink_does_not_know_yet_is_offered_again(
    smsc: Smsc, sender: SmppSender
) -> None:
    answers = [False, True]
    seen: list[DeliveryReport] = []

    async def sink(report: DeliveryReport) -> bool:
        seen.append(report)
        return answers.pop(0)

    sender.report_to(sink)  # type: ignore[arg-type]
    await sender.send(make_sms())

    await smsc.wait_for_count_async("deliver_sm_resp", 1)
    assert len(seen) == 2 and seen[0] == seen[1]


@pytest.mark.parametrize(
    ("text", "tlv_id", "state", "expected"),
    [
        (
            "id:abc123 sub:001 dlvrd:001 submit date:2401011200 done date:2401011201 "
            "stat:DELIVRD err:000 text:Your code",
            None,
            None,
            DeliveryReport("abc123", MessageStatus.DELIVERED, "DELIVRD"),
        ),
        (
            "id:abc123 sub:001 dlvrd:000 submit date:240101120000 done date:240101120100 "
            "stat:UNDELIV err:0A1",
            None,
            None,
            DeliveryReport("abc123", MessageStatus.UNDELIVERED, "UNDELIV err:0A1"),
        ),
        (
            "id:abc stat:EXPIRED err:000",
            None,
            None,
            DeliveryReport("abc", MessageStatus.UNDELIVERED, "EXPIRED err:000"),
        ),
        (
            "id:abc stat:REJECTD",
            None,
            None,
            DeliveryReport("abc", MessageStatus.UNDELIVERED, "REJECTD"),
        ),
        ("id:abc stat:ACCEPTD", None, None, DeliveryReport("abc", None, "ACCEPTD")),
        ("id:abc stat:ENROUTE", None, None, DeliveryReport("abc", None, "ENROUTE")),
        (
            "id:abc stat:delivrd",
            None,
            None,
            DeliveryReport("abc", MessageStatus.DELIVERED, "DELIVRD"),
        ),
        ("", "tlv-id", 2, DeliveryReport("tlv-id", MessageStatus.DELIVERED, "DELIVRD")),
        (
            "id:text-id stat:DELIVRD",
            "tlv-id",
            5,
            DeliveryReport("tlv-id", MessageStatus.UNDELIVERED, "UNDELIV"),
        ),
        ("stat:DELIVRD", None, None, None),
    ],
)
def test_parse_receipt(
    text: str, tlv_id: str | None, state: int | None, expected: DeliveryReport | None
) -> None:
    assert parse_receipt(text, receipted_message_id=tlv_id, message_state=state) == expected


# --------------------------------------------------------------------------------------------
# The bind: keep-alive, reconnection, failures, unbind


async def test_enquire_link_keeps_the_bind(smsc: Smsc) -> None:
    sender = make_sender(smsc, enquire_link_seconds=0.1)
    try:
        await sender.check()
        await smsc.wait_for_count_async("enquire_link", 2)
        assert (await sender.send(make_sms())).provider_ref
    finally:
        await sender.aclose()


async def test_the_bind_is_made_again_after_the_smsc_drops_it(
    smsc: Smsc, sender: SmppSender
) -> None:
    await sender.send(make_sms())
    smsc.drop()
    await smsc.wait_for_count_async("bind_transceiver", 2)

    receipt = await sender.send(make_sms(message_id=OTHER_ID))

    assert receipt.provider_ref
    assert [r["text"] for r in smsc.accepted()] == [TEXT, TEXT]


async def test_a_refused_password_is_transient_and_never_shown(smsc: Smsc) -> None:
    sender = make_sender(smsc, password="wrong1")
    try:
        with pytest.raises(TransientDeliveryError) as info:
            await sender.send(make_sms())
    finally:
        await sender.aclose()

    assert not isinstance(info.value, DeliveryTimeout)
    assert "ESME_RINVPASWD" in str(info.value)
    assert_no_secret(info.value, "wrong1", PASSWORD)
    assert smsc.submits() == []
    # The SMSC records a PDU as it answers it: the record may come just after our bind_resp.
    await smsc.wait_for_count_async("bind_transceiver", 1)
    (bind,) = smsc.records("bind_transceiver")[:1]
    assert bind["password_ok"] is False


async def test_no_smsc_is_transient_before_anything_is_written() -> None:
    sender = SmppSender(
        host="127.0.0.1",
        port=free_port(),
        system_id="otpgate",
        password=PASSWORD,
        timeout_seconds=2.0,
    )
    try:
        with pytest.raises(TransientDeliveryError) as info:
            await sender.send(make_sms())
        with pytest.raises(TransientDeliveryError):
            await sender.check()
    finally:
        await sender.aclose()
    assert not isinstance(info.value, DeliveryTimeout)
    assert "cannot connect" in str(info.value)


async def test_check_binds_without_sending_and_aclose_unbinds(smsc: Smsc) -> None:
    sender = make_sender(smsc, system_type="otp")
    await sender.check()
    await sender.check()  # the live bind
    await sender.aclose()

    smsc.sync()
    binds = smsc.records("bind_transceiver")
    assert len(binds) == 1
    assert binds[0]["system_id"] == smsc.system_id and binds[0]["system_type"] == "otp"
    assert binds[0]["interface_version"] == 0x34
    assert smsc.records("unbind") and smsc.submits() == []
    with pytest.raises(TransientDeliveryError, match="closed"):
        await sender.send(make_sms())


def test_repr_names_the_bind_not_the_password(smsc: Smsc) -> None:
    sender = make_sender(smsc)
    assert PASSWORD not in repr(sender)
    assert smsc.system_id in repr(sender)


# --------------------------------------------------------------------------------------------
# Configuration: OTPGATE_SMPP_URL


def test_the_provider_is_registered_and_built_from_the_url(smsc: Smsc) -> None:
    sender = build_sender(
        Settings(sms_provider="smpp", smpp_url=smsc.url("window=20&throughput=500"))  # type: ignore[arg-type]
    )
    assert isinstance(sender, SmppSender)
    assert sender.name == "smpp"
    assert "window=20" in repr(sender) and PASSWORD not in repr(sender)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "needs OTPGATE_SMPP_URL"),
        ("http://otpgate:pwSECRET@127.0.0.1:2775", "smpp://"),
        ("smpp://127.0.0.1:2775", "SYSTEM_ID:PASSWORD"),
        ("smpp://otpgate@127.0.0.1:2775", "SYSTEM_ID:PASSWORD"),
        ("smpp://otpgate:pwSECRET@:2775", "host"),
        ("smpp://otpgate:pwSECRET@127.0.0.1:notaport", "port"),
        ("smpp://otpgate:pwSECRETtoolong@127.0.0.1", "at most 8"),
        ("smpp://a-system-id-too-long:pwSECRET@127.0.0.1", "SYSTEM_ID"),
        ("smpp://otpgate:pwSECRET@127.0.0.1?window=0", "window"),
        ("smpp://otpgate:pwSECRET@127.0.0.1?window=many", "window"),
        ("smpp://otpgate:pwSECRET@127.0.0.1?throughput=-1", "throughput"),
        ("smpp://otpgate:pwSECRET@127.0.0.1?source_ton=9", "source_ton"),
        ("smpp://otpgate:pwSECRET@127.0.0.1?source=not%20a%20valid%20sender", "source"),
        ("smpp://otpgate:pwSECRET@127.0.0.1?passwd=x", "unknown query option"),
    ],
)
def test_a_bad_url_names_the_setting_never_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_sender(Settings(sms_provider="smpp", smpp_url=url))  # type: ignore[arg-type]
    shown = str(info.value)
    assert "OTPGATE_SMPP_URL" in shown
    assert says in shown
    assert "pwSECRET" not in shown


def test_a_valid_url_without_port_defaults_to_2775() -> None:
    sender = build_sender(
        Settings(sms_provider="smpp", smpp_url="smpp://otpgate:pw@127.0.0.1")  # type: ignore[arg-type]
    )
    assert "port=2775" in repr(sender)
