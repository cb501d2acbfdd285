"""sidecarless: CiliumNetworkPolicy L7 rules on one shared Envoy per node, L3/L4 in TC eBPF."""

__version__ = "0.1.0"
