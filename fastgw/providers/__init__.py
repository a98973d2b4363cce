"""Providers: one module per wire format behind one interface (base.pyx); the config's `provider` names one.

openai     the pass-through (no translation step on its path)
azure      the OpenAI format at Azure's deployment URLs (a pass-through too)
anthropic  Anthropic's Messages API, translated (and passed through for Anthropic clients on /v1/messages)
gemini     Google's Gemini API, translated

Anthropic's Messages API is also served in front of the OpenAI formats (messages.py). The pure translations
between wire formats are in wire/.
"""
from fastgw.providers.anthropic import Anthropic
from fastgw.providers.azure import Azure
from fastgw.providers.gemini import Gemini
from fastgw.providers.openai import OpenAI

# Config name -> the provider instance every deployment of that format shares (providers hold no state).
PROVIDERS = {"openai": OpenAI(), "azure": Azure(), "anthropic": Anthropic(), "gemini": Gemini()}
