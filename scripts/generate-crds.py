"""Write manifests/crds/: the CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy CRDs (cilium.io/v2), for
clusters without Cilium. One rule schema serves both (`spec` and `specs`); tests check the files are current.

The schema types the fields sidecarless implements and keeps the rest of Cilium's (toFQDNs, kafka rules, ...)
with x-kubernetes-preserve-unknown-fields: a policy written for Cilium is stored whole, and the agent reports
what it cannot honour in the object's status instead of the API server silently pruning it.

    .venv/bin/python scripts/generate-crds.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from sidecarless.policy.model import ENTITIES, MISMATCH_ACTIONS

OUT = Path(__file__).resolve().parent.parent / "manifests" / "crds"
# Cilium's pattern: a port number (0-65535) or an IANA service name.
PORT_PATTERN = (
    r"^(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
    r"|([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*$"
)
KEEP = {"x-kubernetes-preserve-unknown-fields": True}


def strings(**extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string", **extra}}


def array(items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **extra}


LABEL_SELECTOR = {
    "type": "object",
    "description": "A Kubernetes label selector; keys may carry Cilium's source prefix (k8s:, any:).",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "matchExpressions": array(
            {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": strings(),
                },
            }
        ),
    },
}
CIDR_RULE = {
    "type": "object",
    "properties": {"cidr": {"type": "string", "format": "cidr"}, "except": strings(format="cidr")},
    **KEEP,
}
HEADER_MATCH = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "value": {"type": "string"},
        "secret": {
            "type": "object",
            "required": ["name"],
            "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}},
        },
        "mismatch": {"type": "string", "enum": list(MISMATCH_ACTIONS)},
    },
}
HTTP_RULE = {
    "type": "object",
    "description": "method, path and host are extended POSIX regular expressions matched against the whole value.",
    "properties": {
        "method": {"type": "string"},
        "path": {"type": "string"},
        "host": {"type": "string"},
        "headers": strings(),
        "headerMatches": array(HEADER_MATCH),
    },
}
PORT_RULE = {
    "type": "object",
    "properties": {
        "ports": array(
            {
                "type": "object",
                "required": ["port"],
                "properties": {
                    "port": {"type": "string", "pattern": PORT_PATTERN},
                    "endPort": {"type": "integer", "format": "int32", "minimum": 0, "maximum": 65535},
                    "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP", "ANY"]},
                },
            },
            maxItems=40,
        ),
        "rules": {"type": "object", "properties": {"http": array(HTTP_RULE)}, **KEEP},
    },
    **KEEP,
}


def peer_rule(direction: str) -> dict[str, Any]:
    prefix = "from" if direction == "ingress" else "to"
    return {
        "type": "object",
        "properties": {
            f"{prefix}Endpoints": array(LABEL_SELECTOR),
            f"{prefix}CIDR": strings(format="cidr"),
            f"{prefix}CIDRSet": array(CIDR_RULE),
            f"{prefix}Entities": strings(enum=list(ENTITIES)),
            "toPorts": array(PORT_RULE),
        },
        **KEEP,
    }


RULE = {
    "type": "object",
    "properties": {
        "description": {"type": "string"},
        "endpointSelector": LABEL_SELECTOR,
        "ingress": array(peer_rule("ingress")),
        "ingressDeny": array(peer_rule("ingress")),
        "egress": array(peer_rule("egress")),
        "egressDeny": array(peer_rule("egress")),
        "enableDefaultDeny": {
            "type": "object",
            "properties": {"ingress": {"type": "boolean"}, "egress": {"type": "boolean"}},
        },
    },
    **KEEP,
}
STATUS = {
    "type": "object",
    "description": "Each node's verdict on the policy, written by the node's agent.",
    "properties": {
        "nodes": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "ok": {"type": "boolean"},
                    "enforcing": {"type": "boolean"},
                    "error": {"type": "string"},
                    "lastUpdated": {"type": "string", "format": "date-time"},
                    "localPolicyRevision": {"type": "integer", "format": "int64"},
                },
                **KEEP,
            },
        },
    },
    **KEEP,
}


def crd(kind: str, plural: str, short_names: list[str], scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.cilium.io", "labels": {"app.kubernetes.io/part-of": "sidecarless"}},
        "spec": {
            "group": "cilium.io",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["cilium", "ciliumpolicy"],
            },
            "scope": scope,
            "versions": [
                {
                    "name": "v2",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["metadata"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": RULE,
                                "specs": array(RULE),
                                "status": STATUS,
                            },
                        }
                    },
                }
            ],
        },
    }


CRDS = {
    "ciliumnetworkpolicies.yaml": crd(
        "CiliumNetworkPolicy", "ciliumnetworkpolicies", ["cnp", "ciliumnp"], "Namespaced"
    ),
    "ciliumclusterwidenetworkpolicies.yaml": crd(
        "CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies", ["ccnp"], "Cluster"
    ),
}


class _NoAliases(yaml.SafeDumper):
    """The rule schema appears many times; each copy written out, no YAML anchors (kubectl takes either, people
    read copies more easily)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(document: dict[str, Any]) -> str:
    header = "# Generated by scripts/generate-crds.py; edit that, then run it.\n"
    return header + yaml.dump(document, Dumper=_NoAliases, sort_keys=False, width=120)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, document in CRDS.items():
        (OUT / name).write_text(render(document))
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
