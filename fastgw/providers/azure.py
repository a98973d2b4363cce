"""Azure OpenAI: the OpenAI wire format at Azure's deployment URLs. Bodies and streams pass through untouched
(Azure's content-filter errors are OpenAI-shaped already); only the request lines and the key header differ.

url: https://<resource>.openai.azure.com; model: the Azure deployment name; api_version: the api-version query
value; auth: "" (the api-key header) or "bearer" (Authorization: Bearer, for an Entra ID token in key_env).
"""
from __future__ import annotations

from urllib.parse import quote

from fastgw.providers.openai import OpenAI
from fastgw.providers.base import Provider

API_VERSION = "2024-10-21"   # the latest GA data-plane version
# Pass-through paths (below /v1) that Azure serves per deployment; the rest are per resource.
_DEPLOYMENT_SCOPED = ("/audio/", "/images/", "/moderations")


class Azure(OpenAI):
    def __init__(self):
        Provider.__init__(self, "azure", False)

    def check(self, d):
        if not d.model:
            return "model: the azure provider needs the Azure deployment name as model"
        if d.auth not in ("", "api-key", "bearer"):
            return f"auth: expected \"api-key\" or \"bearer\", got {d.auth!r}"
        return ""

    def request_lines(self, base_path, endpoints, d):
        base = base_path.removesuffix("/openai")
        query = "?api-version=" + quote(d.api_version or API_VERSION, safe="-._~")
        deployment = f"{base}/openai/deployments/{quote(d.model, safe='-._~')}"
        lines = {}
        for ep in endpoints:
            if ep == "/v1/responses":           # not per deployment: the model goes in the body
                path = f"{base}/openai/responses{query}"
            elif ep.startswith("/v1/messages"):
                continue                         # served as chat by the messages front
            else:
                path = f"{deployment}{ep[3:]}{query}"
            lines[ep] = b"POST " + path.encode() + b" HTTP/1.1\r\n"
        return lines

    def passthrough_line(self, ex, d):
        # Endpoints of a model (audio, images) live under the deployment; the others (files, batches, vector
        # stores, fine-tuning) at the resource. The client's query is kept, with the api-version added.
        target = ex._parser.target if ex._parser is not None else ex.path.encode("latin-1")
        path, _, query = target.decode("latin-1").partition("?")
        base = d.base_path.removesuffix("/openai")
        rest = path[3:]
        if rest.startswith(_DEPLOYMENT_SCOPED):
            path = f"{base}/openai/deployments/{quote(d.model, safe='-._~')}{rest}"
        else:
            path = f"{base}/openai{rest}"
        version = "api-version=" + quote(d.config.api_version or API_VERSION, safe="-._~")
        query = f"{query}&{version}" if query else version
        return ex.method + b" " + f"{path}?{query}".encode("latin-1") + b" HTTP/1.1\r\n"

    def models_target(self, base_path, cursor, page_size):
        # A deployment is one model (`model` is required), so the resource's model list says nothing about it.
        return None

    def header_lines(self, host_value, key, d):
        lines = f"host: {host_value}\r\n"
        if key:
            lines += f"authorization: Bearer {key}\r\n" if d.auth == "bearer" else f"api-key: {key}\r\n"
        return lines.encode()
