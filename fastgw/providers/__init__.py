"""Providers: one module per wire format behind one interface (base.pyx); the config's `provider` names one.

openai   the pass-through (no translation step on its path)
"""
from fastgw.providers.openai import OpenAI

# Config name -> the provider instance every deployment of that format shares (providers hold no state).
PROVIDERS = {"openai": OpenAI()}
