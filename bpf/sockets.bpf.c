// SPDX-License-Identifier: Apache-2.0
// Socket acceleration (as Cilium's sockops and merbridge do it): data between two sockets of one TCP connection
// on this node goes from the sender's socket straight into its peer's receive queue, past both TCP/IP stacks and
// the veths. A same-node L7 flow has two such connections (client pod -> proxy, proxy -> server pod), a
// same-node L4 flow one (pod -> pod).
//
// scl_sock_ops (sock_ops, on the cgroup the pods and the proxy run in) adds an established socket to
// scl_sockets only when its connection is a flow from_pod or to_pod already let through (a live conntrack entry
// decided at the policy revision in force): the handshake crossed the TC programs, so policy decided it there.
// scl_sk_msg (sk_msg, on scl_sockets) redirects each message to the peer while that still holds. When it no
// longer does (the policy changed since the flow was decided, the flow closes or expires, the peer is not there,
// acceleration is off), the socket is marked (sk_msg may not take it out of the map) and its data takes the stack
// for good, where from_pod decides the flow again: a socket never alternates between the two paths, so its bytes
// cannot overtake each other.
//
// A pod's socket and the proxy's socket of one connection can have the same four addresses (the proxy answers
// for the server's address, and opens egress upstream connections from the pod's address): scl_socket_key says
// which side a socket lives on, and a pod's socket looks for its peer on the proxy's side exactly when its flow
// goes through the proxy, so no pod is ever paired with another pod past it.

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>

#include "sidecarless.h"

#define SCL_AF_INET 2
#define SCL_AF_INET6 10

BPF_SOCKHASH(scl_sockets, struct scl_socket_key, SCL_SOCKETS_MAX);
// Each paired socket's state, created when it is paired (no room: not paired) and gone with the socket: 1 once its
// data went through the stack, where it stays (scl_sk_msg may not take a socket out of scl_sockets itself).
BPF_SK_STORAGE(scl_socket_on_stack, u8);

// Map methods (.lookup, ...) are rewritten by BCC in the compiled file only, not in a header: these live here.
static __always_inline void count(u32 counter)
{
	u64 *value = scl_counters.lookup(&counter);
	if (value)
		__sync_fetch_and_add(value, 1);
}

static __always_inline u64 config_or(u32 index, u64 fallback)
{
	u64 *value = scl_config.lookup(&index);
	return value && *value ? *value : fallback;
}

static __always_inline void key_from_ipv4(struct scl_addr *addr, __be32 ip)
{
	addr->words[0] = 0;
	addr->words[1] = 0;
	addr->words[2] = bpf_htonl(0xffff);
	addr->words[3] = ip;
}

// One 32-bit load per context field: the verifier refuses the 64-bit loads clang would merge neighbours into.
#define SCL_READ32(field) ({ u32 value_ = (field); asm volatile("" ::: "memory"); value_; })

// Ports as both contexts give them: the local one in host order, the remote one in network order in the upper
// half (Cilium's bpf_sockops.c reads them the same way).
#define SCL_SOCKET_KEY(key, ctx)                                                                          \
	({                                                                                                \
		int known = 1;                                                                            \
		if ((ctx)->family == SCL_AF_INET) {                                                       \
			key_from_ipv4(&(key)->local, SCL_READ32((ctx)->local_ip4));                                   \
			key_from_ipv4(&(key)->remote, SCL_READ32((ctx)->remote_ip4));                                 \
		} else if ((ctx)->family == SCL_AF_INET6) {                                               \
			(key)->local.words[0] = SCL_READ32((ctx)->local_ip6[0]);                                      \
			(key)->local.words[1] = SCL_READ32((ctx)->local_ip6[1]);                                      \
			(key)->local.words[2] = SCL_READ32((ctx)->local_ip6[2]);                                      \
			(key)->local.words[3] = SCL_READ32((ctx)->local_ip6[3]);                                      \
			(key)->remote.words[0] = SCL_READ32((ctx)->remote_ip6[0]);                                    \
			(key)->remote.words[1] = SCL_READ32((ctx)->remote_ip6[1]);                                    \
			(key)->remote.words[2] = SCL_READ32((ctx)->remote_ip6[2]);                                    \
			(key)->remote.words[3] = SCL_READ32((ctx)->remote_ip6[3]);                                    \
		} else {                                                                                  \
			known = 0;                                                                        \
		}                                                                                         \
		(key)->local_port = bpf_htons((u16)SCL_READ32((ctx)->local_port));                                    \
		(key)->remote_port = (__be16)(SCL_READ32((ctx)->remote_port) >> 16);                        \
		known;                                                                                    \
	})

static __always_inline int is_local_pod(struct scl_addr *ip)
{
	struct scl_endpoint_key key = {.ip = *ip};
	struct scl_endpoint_info *endpoint = scl_endpoints.lookup(&key);

	return endpoint && endpoint->ifindex;
}

// The flow the socket's connection is, as the TC programs let it through (either direction): live, open,
// allowed, and decided at the policy revision in force (the node's own flows are never decided again).
static __always_inline struct scl_ct_entry *allowed_flow(struct scl_socket_key *key)
{
	struct scl_ct_key flow = {};
	struct scl_ct_entry *entry;
	u32 now = bpf_ktime_get_coarse_ns() >> SCL_CT_TICK_SHIFT;

	flow.saddr = key->local;
	flow.daddr = key->remote;
	flow.sport = key->local_port;
	flow.dport = key->remote_port;
	flow.protocol = IPPROTO_TCP;
	entry = scl_conntrack.lookup(&flow);
	if (!entry) {
		flow.saddr = key->remote;
		flow.daddr = key->local;
		flow.sport = key->remote_port;
		flow.dport = key->local_port;
		entry = scl_conntrack.lookup(&flow);
	}
	if (!entry || (s32)(entry->expires - now) < 0 || (entry->flags & SCL_CT_CLOSING))
		return NULL;
	if (entry->action != SCL_ACTION_ALLOW && entry->action != SCL_ACTION_REDIRECT)
		return NULL;
	if (!(entry->flags & SCL_CT_FROM_NODE) && entry->revision != config_or(SCL_CONFIG_POLICY_REVISION, 0))
		return NULL;
	return entry;
}

// The key the peer socket has: the ends swapped, on the proxy's side when a pod's flow goes through the proxy
// or comes from the node, else on a pod's side. 0: the peer is not a socket of this node.
static __always_inline int peer_of(struct scl_socket_key *key, struct scl_ct_entry *flow, struct scl_socket_key *peer)
{
	peer->local = key->remote;
	peer->remote = key->local;
	peer->local_port = key->remote_port;
	peer->remote_port = key->local_port;
	if (!key->node_side && (flow->action == SCL_ACTION_REDIRECT || (flow->flags & SCL_CT_FROM_NODE))) {
		peer->node_side = 1;
		return 1;
	}
	peer->node_side = 0;
	return is_local_pod(&key->remote);
}

int scl_sock_ops(struct bpf_sock_ops *skops)
{
	struct scl_socket_key key = {};
	struct scl_socket_key peer = {};
	struct scl_ct_entry *flow;
	struct bpf_sock *sk = skops->sk;
	long added;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (!sk)
		return 1;
	if (!config_or(SCL_CONFIG_SOCKETS, 0) || !SCL_SOCKET_KEY(&key, skops))
		return 1;
	key.node_side = bpf_get_netns_cookie(skops) == config_or(SCL_CONFIG_NODE_NETNS, 0);
	flow = allowed_flow(&key);
	if (!flow || !peer_of(&key, flow, &peer))
		return 1;
	if (!scl_socket_on_stack.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE))
		return 1;
	// BPF_NOEXIST: a key already taken (by a connection that is not this one) keeps its socket.
	added = scl_sockets.sock_hash_update(skops, &key, BPF_NOEXIST);
	if (added == 0)
		count(SCL_COUNTER_SOCKETS_PAIRED);
	return 1;
}

int scl_sk_msg(struct sk_msg_md *msg)
{
	struct scl_socket_key key = {};
	struct scl_socket_key peer = {};
	struct scl_ct_entry *flow;
	struct bpf_sock *sk = msg->sk;
	u8 *on_stack;

	if (!sk)
		return SK_PASS;
	on_stack = scl_socket_on_stack.sk_storage_get(sk, 0, 0);
	if (!on_stack || *on_stack || !SCL_SOCKET_KEY(&key, msg))
		return SK_PASS;
	key.node_side = bpf_get_netns_cookie(msg) == config_or(SCL_CONFIG_NODE_NETNS, 0);
	flow = config_or(SCL_CONFIG_SOCKETS, 0) ? allowed_flow(&key) : NULL;
	if (flow && peer_of(&key, flow, &peer)) {
		long redirected = scl_sockets.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
		if (redirected == SK_PASS)
			return SK_PASS;
	}
	// For good: this socket's later data must not overtake what the stack carries now.
	*on_stack = 1;
	count(SCL_COUNTER_SOCKETS_UNPAIRED);
	return SK_PASS;
}
