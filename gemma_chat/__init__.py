"""gemma-chat: talk to Google's Gemma models on your own machine."""

__version__ = "0.1.0"
