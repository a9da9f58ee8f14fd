"""callbridge: a Twilio phone number to Deepgram Voice Agent bridge."""

__version__ = "0.1.0"
