"""TwiML documents and the names of the stream's parameters, with nothing but the standard
library: the sans-I/O core (``app.core``) builds the fallback and transfer TwiML itself, and
the twilio SDK's TwiML classes sit in a package that also loads its HTTP client. The documents
are the SDK's byte for byte (same ElementTree serialisation, same XML declaration); a test
compares them for every shape we send."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'  # what the twilio SDK writes
TOKEN_PARAMETER = "stream_token"  # <Parameter> carrying the stream's one-time token
PROFILE_PARAMETER = "profile"  # <Parameter> naming the agent profile of the call
DIRECTION_PARAMETER = "direction"  # "outbound" on the stream of a call we placed
MAX_PARAMETER_VALUE = 400  # Twilio limits a <Parameter> name+value to 500 characters
DEFAULT_FALLBACK_SAY = "Sorry, our assistant is not available right now. Please try again later. Goodbye."


def _document(response: ET.Element) -> str:
    return XML_DECLARATION + ET.tostring(response, encoding="unicode", short_empty_elements=True)


def _say(parent: ET.Element, text: str) -> None:
    ET.SubElement(parent, "Say").text = text


def _dial(parent: ET.Element, destination: str) -> None:
    """A ``<Dial>`` to an E.164 number, or to a ``sip:`` URI."""
    dial = ET.SubElement(parent, "Dial")
    ET.SubElement(dial, "Sip" if destination.startswith("sip:") else "Number").text = destination


@dataclass(frozen=True)
class Fallback:
    """What a caller hears when the agent cannot take the call: ``say``, then a person at
    ``dial`` (an E.164 number or ``sip:`` URI) or the end of the call."""

    say: str = DEFAULT_FALLBACK_SAY
    dial: str | None = None

    def append_to(self, response: ET.Element) -> None:
        _say(response, self.say)
        if self.dial is None:
            ET.SubElement(response, "Hangup")
        else:
            _dial(response, self.dial)


def connect_twiml(
    media_url: str,
    token: str,
    caller: str,
    callee: str,
    profile: str = "",
    then: Fallback | None = None,
    outbound: bool = False,
) -> str:
    """``<Connect><Stream>``, and ``then`` after it: Twilio runs what follows ``<Connect>`` when
    the stream ends without the call having been hung up or redirected, so a bridge that dies
    (or drops the stream) leaves the caller with the fallback instead of a dead line. Only with
    REST credentials: without them, closing the stream is how the bridge hangs up."""
    response = ET.Element("Response")
    stream = ET.SubElement(ET.SubElement(response, "Connect"), "Stream", url=media_url)
    parameters = [(TOKEN_PARAMETER, token)]
    if profile:
        parameters.append((PROFILE_PARAMETER, profile))
    parameters += [("from", caller[:MAX_PARAMETER_VALUE]), ("to", callee[:MAX_PARAMETER_VALUE])]
    if outbound:
        parameters.append((DIRECTION_PARAMETER, "outbound"))
    for name, value in parameters:
        ET.SubElement(stream, "Parameter", name=name, value=value)
    if then is not None:
        then.append_to(response)
    return _document(response)


def fallback_twiml(say: str = DEFAULT_FALLBACK_SAY, dial: str | None = None) -> str:
    """The fallback (``Fallback``) as a whole TwiML document."""
    response = ET.Element("Response")
    Fallback(say, dial).append_to(response)
    return _document(response)


def transfer_twiml(destination: str) -> str:
    """TwiML that dials ``destination``."""
    response = ET.Element("Response")
    _dial(response, destination)
    return _document(response)


def hangup_twiml() -> str:
    response = ET.Element("Response")
    ET.SubElement(response, "Hangup")
    return _document(response)
