"""Our TwiML (app.twilio.twiml, standard library only) is the twilio SDK's, byte for byte.

The core builds fallback and transfer TwiML and must not load the SDK (it brings an HTTP
client); the SDK stays the oracle for what Twilio documents, for every shape we send."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

from app.twilio import twiml

# what a profile, a caller ID or a spoken sentence may hold: any text XML can carry
xml_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=60,
).filter(lambda s: all(c in "\t\n\r" or ord(c) >= 0x20 for c in s))
destinations = st.one_of(st.from_regex(r"\+[1-9][0-9]{6,14}", fullmatch=True), xml_text.map(lambda s: "sip:" + s))


def sdk_dial(destination: str) -> Dial:
    dial = Dial()
    if destination.startswith("sip:"):
        dial.sip(destination)
    else:
        dial.number(destination)
    return dial


def sdk_fallback(response: VoiceResponse, say: str, dial: str | None) -> None:
    response.say(say)
    if dial is None:
        response.hangup()
    else:
        response.append(sdk_dial(dial))


@settings(max_examples=200, deadline=None)
@given(
    url=xml_text,
    token=xml_text,
    caller=st.text(max_size=600),
    callee=xml_text,
    profile=xml_text,
    outbound=st.booleans(),
    then=st.none() | st.tuples(xml_text, st.none() | destinations),
)
def test_connect_twiml_is_the_sdks(
    url: str, token: str, caller: str, callee: str, profile: str, outbound: bool, then: tuple[str, str | None] | None
) -> None:
    caller = "".join(c for c in caller if c in "\t\n\r" or 0x20 <= ord(c) < 0xD800)
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=url)
    stream.parameter(name=twiml.TOKEN_PARAMETER, value=token)
    if profile:
        stream.parameter(name=twiml.PROFILE_PARAMETER, value=profile)
    stream.parameter(name="from", value=caller[: twiml.MAX_PARAMETER_VALUE])
    stream.parameter(name="to", value=callee[: twiml.MAX_PARAMETER_VALUE])
    if outbound:
        stream.parameter(name=twiml.DIRECTION_PARAMETER, value="outbound")
    response.append(connect)
    if then is not None:
        sdk_fallback(response, *then)
    ours = twiml.connect_twiml(
        url, token, caller, callee, profile, twiml.Fallback(*then) if then is not None else None, outbound
    )
    assert ours == str(response)


@settings(max_examples=200, deadline=None)
@given(say=xml_text, dial=st.none() | destinations)
def test_fallback_twiml_is_the_sdks(say: str, dial: str | None) -> None:
    response = VoiceResponse()
    sdk_fallback(response, say, dial)
    assert twiml.fallback_twiml(say, dial) == str(response)


@given(destination=destinations)
def test_transfer_twiml_is_the_sdks(destination: str) -> None:
    response = VoiceResponse()
    response.append(sdk_dial(destination))
    assert twiml.transfer_twiml(destination) == str(response)


def test_hangup_and_default_fallback_are_the_sdks() -> None:
    hangup = VoiceResponse()
    hangup.hangup()
    assert twiml.hangup_twiml() == str(hangup)
    assert twiml.fallback_twiml() == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Say>'
        "Sorry, our assistant is not available right now. Please try again later. Goodbye."
        "</Say><Hangup /></Response>"
    )


def test_long_parameters_are_cut_to_twilios_limit() -> None:
    xml = twiml.connect_twiml("wss://b.example.com/twilio/media", "t", "+1" + "5" * 900, "+2")
    assert 'value="+1' + "5" * (twiml.MAX_PARAMETER_VALUE - 2) + '"' in xml
    assert "5" * (twiml.MAX_PARAMETER_VALUE - 1) not in xml
