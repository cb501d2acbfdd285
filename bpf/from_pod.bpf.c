// SPDX-License-Identifier: Apache-2.0
// TC programs on the node side of each pod's veth (and on the node's other interfaces).
//
// from_pod (TC ingress: every packet a pod sends, or that enters the node from outside) decides new flows:
// the source pod's egress policy and the destination pod's ingress policy, both by identity, in the kernel.
// A flow on an L7-governed port is marked for the proxy; an nftables TPROXY rule in the node namespace
// delivers it to Envoy's transparent listener. Everything else stays in the kernel: an allowed flow between two
// pods of this node goes from one veth straight to the other (bpf_redirect_neigh), past the node's IP stack.
//
// to_pod (TC egress: every packet entering a pod) records flows the node itself starts (Envoy's upstream
// connections, probes), which policy always allows, so the pod's replies are known as replies. Packets from_pod
// already let through carry its mark and pass at once: most packets cost to_pod no lookup.
//
// Compiled by BCC at load time. SCL_PIN_DIR (a string) is where the maps are pinned, so they outlive the
// agent and are shared with the next load.

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

// SCTP's common header starts with the ports, as TCP's and UDP's do.
struct scl_ports {
	__be16 source;
	__be16 dest;
};

#include "sidecarless.h"

BPF_TABLE_PINNED("hash", struct scl_endpoint_key, struct scl_endpoint_info, scl_endpoints,
		 SCL_ENDPOINTS_MAX, SCL_PIN_DIR "/scl_endpoints");
BPF_TABLE_PINNED("lpm_trie", struct scl_ipcache_key, struct scl_ipcache_value, scl_ipcache,
		 SCL_IPCACHE_MAX, SCL_PIN_DIR "/scl_ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct scl_policy_key, struct scl_policy_entry, scl_policy,
		 SCL_POLICY_MAX, SCL_PIN_DIR "/scl_policy", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct scl_ct_key, struct scl_ct_entry, scl_conntrack,
		 SCL_CONNTRACK_MAX, SCL_PIN_DIR "/scl_conntrack");
BPF_TABLE_PINNED("array", u32, u64, scl_counters, SCL_COUNTER_MAX, SCL_PIN_DIR "/scl_counters");
BPF_TABLE_PINNED("array", u32, u64, scl_config, SCL_CONFIG_MAX, SCL_PIN_DIR "/scl_config");
BPF_RINGBUF_OUTPUT(scl_events, SCL_EVENT_PAGES);

struct scl_packet {
	struct scl_ct_key flow;
	u8 tcp_flags;
	u8 is_syn;
};

static __always_inline void count(u32 counter)
{
	u64 *value = scl_counters.lookup(&counter);
	if (value)
		__sync_fetch_and_add(value, 1);
}

// 0: parsed; 1: not IPv4 (let it pass: ARP must reach the gateway); -1: truncated.
static __always_inline int parse(struct __sk_buff *skb, struct scl_packet *packet)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;

	if ((void *)(eth + 1) > data_end)
		return 1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return 1;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return -1;
	packet->flow.saddr = ip->saddr;
	packet->flow.daddr = ip->daddr;
	packet->flow.protocol = ip->protocol;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
		if ((void *)(tcp + 1) > data_end)
			return -1;
		packet->flow.sport = tcp->source;
		packet->flow.dport = tcp->dest;
		packet->tcp_flags = ((u8 *)tcp)[13];
		packet->is_syn = tcp->syn && !tcp->ack;
	} else if (ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) {
		struct scl_ports *ports = (void *)ip + ip->ihl * 4;
		if ((void *)(ports + 1) > data_end)
			return -1;
		packet->flow.sport = ports->source;
		packet->flow.dport = ports->dest;
	}
	return 0;
}

static __always_inline void reverse_of(struct scl_ct_key *flow, struct scl_ct_key *reverse)
{
	reverse->saddr = flow->daddr;
	reverse->daddr = flow->saddr;
	reverse->sport = flow->dport;
	reverse->dport = flow->sport;
	reverse->protocol = flow->protocol;
}

static __always_inline u32 identity_of(__be32 ip, struct scl_endpoint_info *endpoint)
{
	struct scl_ipcache_key key = {.prefixlen = 32, .ip = ip};
	struct scl_ipcache_value *value;

	if (endpoint)
		return endpoint->identity;
	value = scl_ipcache.lookup(&key);
	return value ? value->identity : SCL_IDENTITY_WORLD;
}

// The policy entry for traffic of `endpoint_ip` in `direction` with `peer`: the peer's own entry (the
// longest port prefix), else the any-peer entry. Compile makes the peer's entry include the any-peer rules.
static __always_inline struct scl_policy_entry *lookup_policy(__be32 endpoint_ip, u8 direction, u32 peer,
							     u8 protocol, __be16 port)
{
	struct scl_policy_key key = {};
	struct scl_policy_entry *entry;

	key.prefixlen = SCL_POLICY_FIXED_BITS + 16;
	key.endpoint_ip = endpoint_ip;
	key.peer_identity = peer;
	key.direction = direction;
	key.protocol = protocol;
	key.port = port;
	entry = scl_policy.lookup(&key);
	if (entry)
		return entry;
	key.peer_identity = SCL_IDENTITY_ANY;
	return scl_policy.lookup(&key);
}

static __always_inline void notify(struct __sk_buff *skb, struct scl_packet *packet, u32 source_identity,
				   u32 destination_identity, u8 direction, u8 kind, u8 reason, u8 action)
{
	struct scl_drop_event *event = scl_events.ringbuf_reserve(sizeof(*event));

	if (!event) {
		count(SCL_COUNTER_EVENTS_LOST);
		return;
	}
	event->timestamp_ns = bpf_ktime_get_ns();
	event->saddr = packet->flow.saddr;
	event->daddr = packet->flow.daddr;
	event->sport = packet->flow.sport;
	event->dport = packet->flow.dport;
	event->source_identity = source_identity;
	event->destination_identity = destination_identity;
	event->ifindex = skb->ifindex;
	event->protocol = packet->flow.protocol;
	event->reason = reason;
	event->tcp_flags = packet->tcp_flags;
	event->direction = direction;
	event->kind = kind;
	event->action = action;
	event->pad = 0;
	scl_events.ringbuf_submit(event, 0);
}

static __always_inline int drop(struct __sk_buff *skb, struct scl_packet *packet, u32 source_identity,
				u32 destination_identity, u8 direction, u8 reason)
{
	count(SCL_COUNTER_DROPPED);
	notify(skb, packet, source_identity, destination_identity, direction, SCL_EVENT_DROP, reason, 0);
	return TC_ACT_SHOT;
}

// The action of one direction: the entry's, or what the direction does without one.
static __always_inline u8 decide(struct scl_endpoint_info *endpoint, u32 enforce_flag, __be32 endpoint_ip,
				 u8 direction, u32 peer, struct scl_packet *packet, u16 *proxy_port)
{
	struct scl_policy_entry *entry;

	if (!endpoint)
		return SCL_ACTION_ALLOW; // not a pod of this node: its own node enforces its policy
	entry = lookup_policy(endpoint_ip, direction, peer, packet->flow.protocol, packet->flow.dport);
	if (!entry)
		return (endpoint->flags & enforce_flag) ? SCL_ACTION_NONE : SCL_ACTION_ALLOW;
	*proxy_port = entry->proxy_port;
	return entry->action;
}

// The kernel's helper takes (ifindex, params, plen, flags); BCC 0.26 declares it without plen, which would
// leave the flags argument unset.
static long (*redirect_neigh)(u32 ifindex, struct bpf_redir_neigh *params, int plen, u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

// Let an allowed packet through: to `ifindex` directly when the flow has one, else to the node's stack.
static __always_inline int pass(struct __sk_buff *skb, u32 ifindex)
{
	skb->mark = (skb->mark & ~SCL_MARK_MAGIC_MASK) | SCL_MARK_DECIDED;
	if (ifindex)
		return redirect_neigh(ifindex, NULL, 0, 0);
	return TC_ACT_OK;
}

static __always_inline int apply(struct __sk_buff *skb, struct scl_ct_entry *flow)
{
	if (flow->action == SCL_ACTION_REDIRECT) {
		skb->mark = SCL_MARK_TO_PROXY | ((u32)flow->proxy_port << 16);
		count(SCL_COUNTER_REDIRECTED);
		return TC_ACT_OK;
	}
	return pass(skb, flow->ifindex);
}

static __always_inline int config_enabled(u32 index)
{
	u64 *value = scl_config.lookup(&index);
	return value && *value;
}

int from_pod(struct __sk_buff *skb)
{
	struct scl_packet packet = {};
	struct scl_ct_key reverse = {};
	struct scl_ct_entry *tracked;
	struct scl_ct_entry verdict = {.action = SCL_ACTION_ALLOW};
	struct scl_endpoint_key endpoint_key = {};
	struct scl_endpoint_info *source, *destination;
	u32 source_identity, destination_identity;
	u16 egress_proxy = 0, ingress_proxy = 0;
	u8 egress, ingress;
	int parsed = parse(skb, &packet);

	if (parsed > 0)
		return pass(skb, 0);
	if (parsed < 0)
		return TC_ACT_SHOT;

	// A SYN always re-evaluates policy: a reused 4-tuple must not inherit an old verdict.
	if (!packet.is_syn) {
		tracked = scl_conntrack.lookup(&packet.flow);
		if (tracked)
			return apply(skb, tracked);
		reverse_of(&packet.flow, &reverse);
		tracked = scl_conntrack.lookup(&reverse);
		if (tracked)
			return pass(skb, tracked->reply_ifindex); // a reply of a tracked flow
	}

	endpoint_key.ip = packet.flow.saddr;
	source = scl_endpoints.lookup(&endpoint_key);
	endpoint_key.ip = packet.flow.daddr;
	destination = scl_endpoints.lookup(&endpoint_key);
	source_identity = identity_of(packet.flow.saddr, source);
	destination_identity = identity_of(packet.flow.daddr, destination);

	egress = decide(source, SCL_ENDPOINT_ENFORCE_EGRESS, packet.flow.saddr, SCL_DIRECTION_EGRESS,
			destination_identity, &packet, &egress_proxy);
	ingress = decide(destination, SCL_ENDPOINT_ENFORCE_INGRESS, packet.flow.daddr, SCL_DIRECTION_INGRESS,
			 source_identity, &packet, &ingress_proxy);

	if (egress == SCL_ACTION_DENY || ingress == SCL_ACTION_DENY)
		return drop(skb, &packet, source_identity, destination_identity,
			    egress == SCL_ACTION_DENY ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS,
			    SCL_DROP_POLICY_DENYLIST);
	if (egress == SCL_ACTION_NONE || ingress == SCL_ACTION_NONE)
		return drop(skb, &packet, source_identity, destination_identity,
			    egress == SCL_ACTION_NONE ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS,
			    SCL_DROP_POLICY_DENIED);
	if (egress == SCL_ACTION_PROXY_UNAVAILABLE || ingress == SCL_ACTION_PROXY_UNAVAILABLE)
		return drop(skb, &packet, source_identity, destination_identity,
			    egress == SCL_ACTION_PROXY_UNAVAILABLE ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS,
			    SCL_DROP_PROXY_UNAVAILABLE);

	// Egress L7 first: the egress listener checks the destination's ingress L7 rules too, so a flow governed
	// by both is checked against both in one pass through Envoy.
	if (egress == SCL_ACTION_REDIRECT) {
		verdict.action = SCL_ACTION_REDIRECT;
		verdict.proxy_port = egress_proxy;
	} else if (ingress == SCL_ACTION_REDIRECT) {
		verdict.action = SCL_ACTION_REDIRECT;
		verdict.proxy_port = ingress_proxy;
	} else if (source && destination && source->ifindex && destination->ifindex &&
		   config_enabled(SCL_CONFIG_DIRECT_ROUTING)) {
		// Both ends are pods of this node: the node's stack has nothing to add to this flow. Both directions
		// go direct, so netfilter sees neither (it would take the replies of a flow it never saw as invalid).
		verdict.ifindex = destination->ifindex;
		verdict.reply_ifindex = source->ifindex;
		count(SCL_COUNTER_DIRECT_FLOWS);
	}
	scl_conntrack.update(&packet.flow, &verdict);
	// A policy verdict for each new flow that a pod's policy decided (as `cilium monitor` shows them), while a
	// monitor watches: an event per new connection costs the agent more than the kernel spends on the flow.
	if (config_enabled(SCL_CONFIG_VERDICT_EVENTS) && (packet.is_syn || packet.flow.protocol != IPPROTO_TCP)) {
		if ((source && (source->flags & SCL_ENDPOINT_ENFORCE_EGRESS)) ||
		    (destination && (destination->flags & SCL_ENDPOINT_ENFORCE_INGRESS)))
			notify(skb, &packet, source_identity, destination_identity,
			       egress == SCL_ACTION_REDIRECT ? SCL_DIRECTION_EGRESS : SCL_DIRECTION_INGRESS,
			       SCL_EVENT_VERDICT, 0, verdict.action);
	}
	return apply(skb, &verdict);
}

int to_pod(struct __sk_buff *skb)
{
	struct scl_packet packet = {};
	struct scl_ct_key reverse = {};
	struct scl_ct_entry allowed = {.action = SCL_ACTION_ALLOW};

	if ((skb->mark & SCL_MARK_MAGIC_MASK) == SCL_MARK_DECIDED)
		return TC_ACT_OK;
	if (parse(skb, &packet) != 0)
		return TC_ACT_OK;
	if (scl_conntrack.lookup(&packet.flow))
		return TC_ACT_OK;
	reverse_of(&packet.flow, &reverse);
	if (scl_conntrack.lookup(&reverse))
		return TC_ACT_OK;
	// Not seen by from_pod: started by the node itself, which may always reach its pods.
	scl_conntrack.update(&packet.flow, &allowed);
	return TC_ACT_OK;
}
