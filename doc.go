// Package ipcluster runs a Go server as a master and 2^k worker processes on
// one Linux host, and has the kernel route every client to a fixed worker by
// the low bits of its source address: IP-sticky clustering with no proxy hop.
//
// # Process model
//
// The program calls Run from its main. Started by hand, the process becomes
// the master: it validates the Config, takes the cluster's lock and control
// socket under RunDir/<Name>, and re-executes its own binary once per slot
// with the IPCLUSTER_* environment variables set. In those worker
// processes Run listens on an OS-chosen port for each public port, TCP or
// UDP, connects back to the master over the Unix socket, and calls the
// application's function with a *Worker, which hands out the listeners
// (TCP) and packet conns (UDP) and names the slot; an HTTP server is
// served with Worker.ServeHTTP, which shuts it down when the worker's
// service ends. Workers run in their own session and outlive the master: a
// master crash drops no connection, and the next master adopts them.
//
// A worker reports ready before it calls the function, unless
// Config.WorkerReady is set: then the function calls Worker.Ready once the
// application can serve, and no slot moves to the worker before that. A
// worker that exits, or whose function returns, within Config.StableAfter
// of becoming ready has failed to start, and its slot is started again
// with backoff rather than at once.
//
// # Routing
//
// For each slot and public port the master routes the clients whose
// address has the slot's bits (taken with a non-contiguous mask) to that
// slot's worker port, with DNAT. Only a connection's first packet is
// matched; conntrack keeps the translation for the rest of it. So the master
// can point a slot at a new worker while the old one keeps every connection
// it has: that is how crashed workers are replaced and workers retired
// without dropping a connection.
//
// Two backends write the routes (Config.Backend). The default, nftables,
// keeps them in maps of an nf_tables inet table written over netlink: a new
// connection costs one hash lookup whatever the number of slots, and each
// change is one atomic transaction for both families, with no helper
// process. The iptables backend keeps one DNAT rule per slot and port in an
// owned nat chain, rewritten atomically with iptables-restore --noflush,
// one process per address family and change.
//
// Unless Config.AllowDirect is set, the nftables backend also refuses new
// connections to a worker's own port that did not come through the routes:
// a client cannot pick its worker, and no direct connection leaves a
// conntrack entry that would make the kernel rewrite the port of a routed
// connection from the same client port.
//
// UDP ports are routed the same way, but conntrack would also keep a UDP
// flow (one client address and port) on its first worker for as long as it
// keeps sending, and a UDP flow has no connection worth keeping. So once a
// rule write moves a slot away from a worker, the master deletes the UDP
// conntrack entries that still point at that worker's UDP port (never a
// TCP one), and the flow's next datagram reaches the slot's new worker.
//
// # Health
//
// Every MonitorInterval the master reads each worker's memory from /proc
// itself and checks its heartbeat; workers report their heap, GC, scheduling
// lag and connections. An active worker over MemoryLimit or LagLimit (after
// StartupGrace), silent for PingTimeout, or failing the application's
// HealthCheck is retired, at most RetireLimit per RetireWindow: its slot
// moves to a spare (Config.Spares) or a fresh worker, and it keeps its
// connections until they close or DrainTimeout passes. Above the
// MemoryBudget's watermarks retired workers are told to finish, then
// killed; active workers never are.
//
// # Deploys
//
// SIGHUP to the master starts the binary on disk as a new master, which
// takes the cluster over: the running master hands it the control socket
// and lock (SCM_RIGHTS) and returns from Run, leaving rules and workers
// alone. Starting a second master does the same. A starting master adopts
// the running workers by the routes in the kernel and rolls those of
// another Config.Version slot by slot, canary first, rolling back by itself
// if the new workers fail. SIGUSR2 restarts every worker the same way, and
// a control client can resize the cluster while it serves.
//
// Started by systemd with NOTIFY_SOCKET (Type=notify), the master reports
// readiness, deploys (as reloads), its stop and watchdog pings over
// sd_notify, and the master that takes over after a deploy names itself
// the unit's main process (NotifyAccess=all). Workers never notify.
//
// # Observability
//
// Config.OnEvent receives the cluster's events. With Config.HTTPAddr set,
// the master also serves Prometheus metrics (/metrics, from a registry of
// its own), probes for a balancer (/healthz, /readyz) and a status page
// (/status, /status.json). Handlers never read the master's state: they
// ask its loop for a snapshot and answer 503 if it does not reply in 2s.
//
// # Privileges
//
// The master needs CAP_NET_ADMIN, and for the iptables backend the
// iptables, iptables-restore and iptables-save binaries (and the ip6tables
// ones to serve IPv6). Workers need no privilege and hold none: the master
// starts them from a thread of its own without capabilities and with
// no_new_privs, so that exec grants them nothing, while its other threads
// and the successor a deploy starts keep CAP_NET_ADMIN. With
// Config.WorkerUser a root master also spawns them as that user, and the
// control socket admits that user as a worker only.
//
// # Development mode
//
// With Config.Dev, or IPCLUSTER_DEV=1 in the environment, Run calls the
// work function in its own process, as slot 0, on sockets bound to the
// public ports themselves: no master, no rules, no root, on any OS, so a
// developer runs the same main on a laptop. Stickiness, deploys, health
// retirements and rules are off (see Config.Dev).
//
// # Platforms
//
// The cluster runs on Linux only. Elsewhere the package builds, Run
// returns ErrNotSupported, and development mode runs.
package ipcluster
