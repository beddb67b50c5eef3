//go:build linux

// Package netlab builds throwaway network namespaces for tests, benchmarks
// and the example sandbox: a server namespace and a client namespace joined
// by a veth pair, addressed from the benchmarking range 198.18.0.0/15 and the
// unique-local range fd00::/8.
//
// # Safety
//
// Nothing here touches the machine's own network namespace. Namespaces are
// created on a dedicated OS thread that is switched back before it is
// released; the veth pair is created by a netlink socket opened inside the
// server namespace, its peer placed straight into the client namespace; and
// every address and neighbour entry is added through sockets that belong to
// the lab.
//
// Namespaces are named ipct-<8 hex digits> under /var/run/netns, so that
// `ip netns exec` works on them; each name is a symlink to the namespace's
// bind mount in /var/run/ipcluster-netlab, out of reach of what `ip netns
// add` does to /var/run/netns (see newNS). Lab.Close removes them; if the
// process dies first (a crash, a test timeout, ^C, SIGKILL), a watchdog
// process that the first New of each process starts removes them instead,
// so nothing is left behind. The watchdog is the program's own executable, re-executed: this
// package's init function turns it into the watchdog when it finds its
// environment variable.
//
// # Threads
//
// A network namespace belongs to an OS thread, not to a process or a
// goroutine. Every operation that needs the lab's namespace (NS.Do and
// everything built on it) runs on a fresh goroutine locked to its thread for
// the duration. Sockets, netlink handles and child processes keep the
// namespace they were created in, so they can be used from any goroutine
// afterwards.
package netlab

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Interface names inside the lab. Interface names are per namespace, so
// labs never collide with each other or with the host.
const (
	ServerLink = "ipcs0" // the server namespace's end of the veth pair
	ClientLink = "ipcc0" // the client namespace's end
)

const (
	netnsDir   = "/var/run/netns"            // where iproute2 looks for named namespaces
	mountDir   = "/var/run/ipcluster-netlab" // where the names in netnsDir point: see newNS
	namePrefix = "ipct-"

	defaultClients = 64
	maxClients     = 1024
	localAddrs     = 16

	// requireEnv makes NewT fail instead of skip without privileges, for CI
	// where a silently skipped suite would hide a broken runner.
	requireEnv = "IPCLUSTER_REQUIRE_NETNS"
	// requireToolsEnv makes Tool fail instead of skip, for runs that
	// installed every program the tests use: test.sh sets it once it has,
	// and CI runs test.sh, so no test is skipped there for want of one.
	requireToolsEnv = "IPCLUSTER_REQUIRE_TOOLS"
)

var errClosed = errors.New("netlab: namespace is closed (or was not created by New)")

// NS is one named network namespace.
type NS struct {
	Name string // e.g. "ipct-1a2b3c4d", under /var/run/netns (a symlink)

	// mu guards h against Close: an fd number is reused by the next open
	// after it is closed, so a Do racing with Close could otherwise setns
	// into whatever namespace (another lab's, or the host's) was opened
	// next under the same number. Do holds the read lock only for the
	// setns call itself; once the thread has switched, the fd is not
	// needed any more.
	mu   sync.RWMutex
	h    netns.NsHandle // O_CLOEXEC, so child processes never pin the namespace
	open bool           // h is valid; false for a zero NS or after close
}

// Do runs fn on an OS thread switched into ns, then switches the thread
// back.
//
// fn runs on a goroutine of its own, locked to its thread for the whole
// call, so the scheduler can neither move it to a thread outside ns nor run
// anything else on the switched thread. If switching back fails, the thread
// is never unlocked: the goroutine then exits locked and the runtime
// destroys the thread rather than reusing a thread stuck in the lab (the
// reasoning of containernetworking/plugins pkg/ns).
//
// Only fn's own goroutine is in ns: goroutines that fn starts run on other
// threads, in the process's namespace. Because fn runs on a goroutine other
// than the caller's, it must not call t.FailNow (or t.Fatal): Do reports
// that as an error. A panic in fn is re-raised in the caller's goroutine,
// after the thread has been switched back.
func (ns *NS) Do(fn func() error) error {
	return onSwitchedThread(func() error {
		ns.mu.RLock()
		defer ns.mu.RUnlock()
		if !ns.open {
			return fmt.Errorf("%w: %q", errClosed, ns.Name)
		}
		if err := unix.Setns(int(ns.h), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("netlab: enter namespace %s: %w", ns.Name, err)
		}
		return nil
	}, fn)
}

// Dial connects from inside ns. The socket is created on a thread in ns and
// keeps that namespace for its lifetime, whatever goroutine or thread uses
// it later. src may be the zero Addr to let the kernel choose the source
// address. ctx bounds the connection attempt as in net.Dialer.DialContext.
func (ns *NS) Dial(ctx context.Context, network string, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	address := dst.String()
	switch network {
	case "tcp", "tcp4", "tcp6":
		if src.IsValid() {
			d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
		}
	case "udp", "udp4", "udp6":
		if src.IsValid() {
			d.LocalAddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
		}
	default:
		if !strings.HasPrefix(network, "ip") || !strings.Contains(network, ":") {
			return nil, fmt.Errorf("netlab: dial %s: unsupported network", network)
		}
		// Raw IP ("ip4:icmp", ...) has no ports.
		address = dst.Addr().String()
		if src.IsValid() {
			d.LocalAddr = &net.IPAddr{IP: src.AsSlice(), Zone: src.Zone()}
		}
	}
	var conn net.Conn
	err := ns.Do(func() error {
		var err error
		conn, err = d.DialContext(ctx, network, address)
		return err
	})
	return conn, err
}

// Listen creates a listener inside ns (see Dial).
func (ns *NS) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// Start starts cmd inside ns, in place of cmd.Start; wait for it with
// cmd.Wait as usual.
//
// A new process inherits the namespaces of the thread that forks it, not
// those of the process's main thread, so cmd.Start is called on a thread
// switched into ns: the child and everything it runs live in the lab. (The
// switched thread never passes its namespace on to other threads: while a
// goroutine is locked, the runtime starts new threads from a clean template
// thread, not from the locked one.) cmd.SysProcAttr must not ask for a new
// network namespace of its own.
func (ns *NS) Start(cmd *exec.Cmd) error {
	return ns.Do(cmd.Start)
}

// NFTables opens a lasting nf_tables netlink connection inside ns, usable
// from any goroutine (a netlink socket keeps the namespace it was opened
// in). Close it with CloseLasting.
func (ns *NS) NFTables() (*nftables.Conn, error) {
	var conn *nftables.Conn
	err := ns.Do(func() (err error) {
		conn, err = nftables.New(nftables.AsLasting())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netlab: open nf_tables netlink in %s: %w", ns.Name, err)
	}
	return conn, nil
}

// Inode returns the namespace's inode number, to compare with that of
// /proc/self/ns/net in a process that must make sure it runs in the lab.
func (ns *NS) Inode() (uint64, error) {
	ns.mu.RLock()
	defer ns.mu.RUnlock()
	if !ns.open {
		return 0, fmt.Errorf("%w: %q", errClosed, ns.Name)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(ns.h), &st); err != nil {
		return 0, fmt.Errorf("netlab: stat namespace %s: %w", ns.Name, err)
	}
	return st.Ino, nil
}

// Sysctl writes a network sysctl of this namespace, named by its path under
// /proc/sys, e.g. ns.Sysctl("net/netfilter/nf_conntrack_tcp_be_liberal", "1").
//
// Only net/... is accepted: those are the sysctls that are per network
// namespace. Everything else under /proc/sys is shared with the host, and a
// lab must never change the host.
func (ns *NS) Sysctl(name, value string) error {
	if !strings.HasPrefix(name, "net/") || path.Clean(name) != name || strings.Contains(name, "..") {
		return fmt.Errorf("netlab: sysctl %q: only clean paths under net/ are per namespace", name)
	}
	return ns.Do(func() error {
		// /proc/sys/net resolves to the namespace of the thread that opens
		// it (not of /proc/self, the main thread), so open it here.
		f, err := os.OpenFile(filepath.Join("/proc/sys", name), os.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("netlab: sysctl in %s: %w", ns.Name, err)
		}
		_, werr := f.WriteString(value)
		if err := errors.Join(werr, f.Close()); err != nil {
			return fmt.Errorf("netlab: sysctl %s=%q in %s: %w", name, value, ns.Name, err)
		}
		return nil
	})
}

// close closes the namespace's fd and removes its name. The namespace
// itself disappears once nothing else (a process, a socket) holds it.
func (ns *NS) close() error {
	ns.mu.Lock()
	wasOpen := ns.open
	var err error
	if ns.open {
		ns.open = false
		err = ns.h.Close()
		ns.h = netns.None()
	}
	ns.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("netlab: close namespace %s: %w", ns.Name, err)
	}
	if !wasOpen {
		return err
	}
	if derr := removeNamed(ns.Name); derr != nil {
		// Leave the name with the watchdog, which will try again.
		return errors.Join(err, derr)
	}
	unwatch(ns.Name)
	return err
}

// errGoexit reports that fn ended its goroutine with runtime.Goexit, which
// is what t.FailNow does; it must be called from the test's own goroutine.
var errGoexit = errors.New("netlab: function run in a namespace called runtime.Goexit (t.FailNow/t.Fatal?)")

// onSwitchedThread runs fn on a new goroutine locked to its OS thread, after
// enter has moved that thread into another network namespace, and then
// moves the thread back to the namespace it started in.
//
// enter must either switch the thread or fail without changing it (setns
// and unshare are all-or-nothing). The thread is unlocked only once it is
// known to be back where it started; in every other case the goroutine
// exits still locked, and the runtime kills the thread with it.
func onSwitchedThread(enter, fn func() error) error {
	type result struct {
		err      error
		panicked bool
		value    any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// /proc/thread-self, not /proc/self: the latter is the main
		// thread, whose namespace may differ from this one's.
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("netlab: open current network namespace: %w", err)}
			return
		}
		// Runs last, after the deferred switch back below has used orig.
		defer unix.Close(orig)
		if err := enter(); err != nil {
			runtime.UnlockOSThread() // still where it started
			done <- result{err: err}
			return
		}
		res := result{err: errGoexit} // unless fn returns normally
		defer func() {
			if v := recover(); v != nil {
				res = result{panicked: true, value: v}
			}
			if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
				// Deliberately still locked: the thread dies with
				// this goroutine instead of going back to the pool.
				res.err = errors.Join(res.err, fmt.Errorf("netlab: switch thread back to its namespace: %w", err))
			} else {
				runtime.UnlockOSThread()
			}
			done <- res
		}()
		res.err = fn()
	}()
	r := <-done
	if r.panicked {
		panic(r.value)
	}
	return r.err
}

// Options configures a Lab.
type Options struct {
	// Clients is the number of client addresses per family: default 64,
	// at most 1024.
	Clients int
}

// Lab is a server namespace and a client namespace joined by a veth pair.
//
// Both ends are on-link for each other (no routes), and each end knows the
// other's link-layer address in advance (permanent neighbour entries for
// every lab address), so every address is usable as soon as New returns,
// without waiting for ARP or neighbour discovery. Permanent entries also
// keep big labs out of the kernel's neighbour table limit (gc_thresh3, 1024
// by default), which is shared by all namespaces, the host's included: a
// 1024-client lab resolving its addresses dynamically would overflow it.
type Lab struct {
	Server, Client *NS

	ServerAddr4 netip.Addr // 198.18.0.1, /15 on the server's veth
	ServerAddr6 netip.Addr // fd00::1, /32 on the server's veth

	// ClientAddrs4 are on the client's veth (/15), consecutive from
	// 198.18.1.0 (continuing into 198.18.2.0 after 198.18.1.255), so their
	// low bits take every value.
	ClientAddrs4 []netip.Addr
	// ClientAddrs6 are fd00:0:0:<i>::2 on the client's veth (/32): each is
	// in its own /64, and the low bits of the /64 prefixes take every value.
	ClientAddrs6 []netip.Addr

	// LocalAddrs4 (198.19.0.0-198.19.0.15/32) and LocalAddrs6
	// (fd01:0:0:<i>::1/128, i=0..15) are on the server namespace's
	// loopback, as sources for clients on the server's own host (the nat
	// OUTPUT path).
	LocalAddrs4, LocalAddrs6 []netip.Addr

	closeOnce sync.Once
	closeErr  error
}

// New creates a lab. On error nothing is left behind. Call it from an
// ordinary goroutine, not from inside NS.Do.
func New(opts Options) (l *Lab, err error) {
	if opts.Clients == 0 {
		opts.Clients = defaultClients
	}
	if opts.Clients < 1 || opts.Clients > maxClients {
		return nil, fmt.Errorf("netlab: Options.Clients %d is outside 1..%d", opts.Clients, maxClients)
	}
	l = &Lab{
		ServerAddr4: netip.AddrFrom4([4]byte{198, 18, 0, 1}),
		ServerAddr6: netip.AddrFrom16([16]byte{0: 0xfd, 15: 1}),
	}
	for i := range opts.Clients {
		l.ClientAddrs4 = append(l.ClientAddrs4, netip.AddrFrom4([4]byte{198, 18, byte(1 + i>>8), byte(i)}))
		l.ClientAddrs6 = append(l.ClientAddrs6, netip.AddrFrom16([16]byte{0: 0xfd, 6: byte(i >> 8), 7: byte(i), 15: 2}))
	}
	for i := range localAddrs {
		l.LocalAddrs4 = append(l.LocalAddrs4, netip.AddrFrom4([4]byte{198, 19, 0, byte(i)}))
		l.LocalAddrs6 = append(l.LocalAddrs6, netip.AddrFrom16([16]byte{0: 0xfd, 1: 1, 7: byte(i), 15: 1}))
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, l.Close())
			l = nil
		}
	}()
	if l.Server, err = newNS(); err != nil {
		return nil, err
	}
	if l.Client, err = newNS(); err != nil {
		return nil, err
	}
	if err = l.wire(); err != nil {
		return nil, err
	}
	return l, nil
}

// Close removes the namespaces. It is best-effort (it goes on after an
// error and reports them all) and safe to call more than once; later calls
// return the first call's result.
//
// Processes started in the lab, and sockets still open, keep their
// namespace alive after Close; only its name disappears. Stop them first.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		var errs []error
		for _, ns := range []*NS{l.Server, l.Client} {
			if ns != nil {
				errs = append(errs, ns.close())
			}
		}
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}

// NewT creates a lab for a test and removes it when the test ends, passed
// or failed. Without the privileges to build one (root, or CAP_SYS_ADMIN
// and CAP_NET_ADMIN) it skips the test, or fails it if the environment has
// IPCLUSTER_REQUIRE_NETNS=1 (as in CI, where a skipped suite would go
// unnoticed).
func NewT(t testing.TB, opts Options) *Lab {
	t.Helper()
	requirePrivileges(t)
	l, err := New(opts)
	if errors.Is(err, unix.EPERM) {
		// Capabilities present but still refused, e.g. by a seccomp
		// profile or a security module.
		unprivileged(t, err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A test that failed half-way may leave processes behind (say, a
		// worker whose master it could not stop).
		if n := l.KillProcesses(); n > 0 {
			t.Logf("netlab: killed %d processes left in the lab's namespaces", n)
		}
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	return l
}

// requirePrivileges skips the test, or fails it with
// IPCLUSTER_REQUIRE_NETNS=1, if this process cannot build namespaces.
func requirePrivileges(t testing.TB) {
	t.Helper()
	if why := missingPrivileges(); why != "" {
		unprivileged(t, why)
	}
}

func unprivileged(t testing.TB, why string) {
	t.Helper()
	msg := "netlab: network namespace tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN): " + why
	if os.Getenv(requireEnv) == "1" {
		t.Fatal(msg + " (and " + requireEnv + "=1 is set)")
	}
	t.Skip(msg + "; run as root (e.g. sudo go test), or set " + requireEnv + "=1 to fail instead of skip")
}

// KillProcesses SIGKILLs every process whose network namespace is one of
// the lab's, waits up to 5s for them to go, and returns how many it killed.
// Workers outlive a master that was killed or failed half-way; left
// running, they would keep the lab's namespaces, and its addresses, alive
// for good.
func (l *Lab) KillProcesses() int { return killIn(l.Server, l.Client) }

// KillProcesses SIGKILLs every process in ns, as Lab.KillProcesses does.
func (ns *NS) KillProcesses() int { return killIn(ns) }

// killIn SIGKILLs every process in the namespaces (but this one), waits up
// to 5s for them to go, and returns how many it killed.
func killIn(nss ...*NS) int {
	var killed []int
	for _, ns := range nss {
		if ns == nil {
			continue
		}
		ino, err := ns.Inode()
		if err != nil {
			continue
		}
		for _, pid := range PIDsIn(ino) {
			if pid != os.Getpid() && unix.Kill(pid, unix.SIGKILL) == nil {
				killed = append(killed, pid)
			}
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range killed {
		for Running(pid) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	return len(killed)
}

// PIDsIn lists the processes whose network namespace has inode ino.
func PIDsIn(ino uint64) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Stat("/proc/"+e.Name()+"/ns/net", &st) == nil && st.Ino == ino {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Running reports whether pid exists and is not a zombie. A zombie counts
// as gone: it has released its namespaces and descriptors, and whether its
// parent (init, for an orphaned worker) reaps it is not the test's business.
func Running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// missingPrivileges says which capabilities the process lacks, or "".
func missingPrivileges() string {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return "cannot read capabilities: " + err.Error()
	}
	var missing []string
	for _, c := range []struct {
		bit  uint
		name string
	}{{unix.CAP_SYS_ADMIN, "CAP_SYS_ADMIN"}, {unix.CAP_NET_ADMIN, "CAP_NET_ADMIN"}} {
		if data[c.bit/32].Effective&(1<<(c.bit%32)) == 0 {
			missing = append(missing, c.name)
		}
	}
	if len(missing) == 0 {
		return ""
	}
	return fmt.Sprintf("uid %d lacks %s", os.Geteuid(), strings.Join(missing, " and "))
}

// newNS creates a named network namespace and returns it open.
//
// The namespace is made by unshare on a dedicated thread, which is switched
// back at once, and kept by a bind mount of its fd on a file of mountDir,
// made from this (unswitched) thread. Its name in netnsDir is a symlink to
// that file, which is all `ip netns exec` and friends need: they open the
// name, following the link.
//
// The mount is not made in netnsDir itself, as `ip netns add` does, because
// of what `ip netns add` does to netnsDir: when netnsDir is not yet a mount
// point, it bind-mounts netnsDir over itself, recursively, to make it
// shared. Every namespace mounted there at that moment is then mounted
// twice, once in the copy, which is what the path reaches from then on, and
// once in the original, covered and out of reach: removing the name then
// fails with EBUSY for as long as the host runs, and the namespace leaks.
// Nothing mounts over mountDir, and a symlink is never a mount point.
func newNS() (*NS, error) {
	for _, dir := range []string{netnsDir, mountDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("netlab: %w", err)
		}
	}
	// Start the watchdog (once per process) before claiming a name, so
	// that a name is never left unwatched for longer than a pipe write.
	if err := ensureWatchdog(); err != nil {
		return nil, err
	}
	for range 8 {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("netlab: %w", err)
		}
		name := namePrefix + hex.EncodeToString(b[:])
		file := filepath.Join(mountDir, name)
		// O_EXCL claims the name: the watchdog is told about it only
		// once it is ours, so it can never remove somebody else's.
		f, err := os.OpenFile(file, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("netlab: create %s: %w", file, err)
		}
		f.Close()
		if err := watch(name); err != nil {
			return nil, errors.Join(err, os.Remove(file))
		}
		// removeNamed removes the name only if it is this link, so
		// somebody else's (`ip netns add` of the same name) is safe.
		err = os.Symlink(file, filepath.Join(netnsDir, name))
		if err == nil {
			var ns *NS
			if ns, err = mountNew(name, file); err == nil {
				return ns, nil
			}
		}
		if rerr := removeNamed(name); rerr != nil {
			return nil, errors.Join(err, rerr) // still watched
		}
		unwatch(name)
		if !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("netlab: name namespace %s: %w", name, err)
		}
	}
	return nil, errors.New("netlab: no free namespace name")
}

// mountNew creates a network namespace and bind-mounts it on file.
func mountNew(name, file string) (*NS, error) {
	fd := -1
	err := onSwitchedThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("netlab: create namespace %s: %w", name, err)
		}
		return nil
	}, func() error {
		var err error
		fd, err = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("netlab: open new namespace %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, err
	}
	// The fd keeps the namespace alive from here on, on whatever thread,
	// so the name can be mounted from this unswitched one; the mount keeps
	// it alive (and named) after the fd is closed.
	if err := unix.Mount(fmt.Sprintf("/proc/self/fd/%d", fd), file, "none", unix.MS_BIND, ""); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlab: bind-mount namespace %s: %w", name, err)
	}
	return &NS{Name: name, h: netns.NsHandle(fd), open: true}, nil
}

// removeNamed removes a namespace's name and unmounts and removes its file,
// as `ip netns delete` does. What is already gone, or was never made, is
// not an error; a name in netnsDir that is not this package's link to the
// file is left alone.
//
// Removing a file that is a mount point anywhere in this mount namespace
// fails with EBUSY. Nothing of this package mounts over its own mounts, but
// a copy of mountDir's mounts made elsewhere (a recursive bind mount of
// /run, say) would hold the file too: its copies are unmounted as well,
// and the removal is retried for a while.
func removeNamed(name string) error {
	link, file := filepath.Join(netnsDir, name), filepath.Join(mountDir, name)
	var errs []error
	// The name first, so nobody opens the namespace on its way out.
	if dst, err := os.Readlink(link); err == nil && dst == file {
		if err := os.Remove(link); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("netlab: %w", err))
		}
	}
	var err error
	for wait := time.Millisecond; ; wait *= 2 {
		if err = unmountAll(file); err != nil {
			break
		}
		err = os.Remove(file)
		if err == nil || errors.Is(err, fs.ErrNotExist) {
			err = nil
			break
		}
		if !errors.Is(err, unix.EBUSY) || wait > time.Second {
			err = fmt.Errorf("netlab: %w%s", err, mountedAt(file))
			break
		}
		time.Sleep(wait)
	}
	return errors.Join(append(errs, err)...)
}

// unmountAll unmounts every mount of file, and of its copies elsewhere.
func unmountAll(file string) error {
	paths := append([]string{file}, copiesOf(file)...)
	for _, p := range paths {
		// MNT_DETACH: the mount may be busy (`ip netns exec` in progress).
		// Again until EINVAL, not a mount point: mounts may be stacked.
		for range 16 {
			err := unix.Unmount(p, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
				break
			}
			if err != nil {
				return fmt.Errorf("netlab: unmount %s: %w", p, err)
			}
		}
	}
	return nil
}

// copiesOf lists the other mount points, in this mount namespace, of
// namespace files named as file is in a directory named as mountDir is:
// what a recursive bind mount of a directory above mountDir made of it.
func copiesOf(file string) []string {
	b, err := os.ReadFile("/proc/thread-self/mountinfo")
	if err != nil {
		return nil
	}
	suffix := "/" + filepath.Base(mountDir) + "/" + filepath.Base(file)
	real, err := filepath.EvalSymlinks(file) // /var/run is usually /run
	if err != nil {
		return nil // no file, no mount
	}
	var paths []string
	for _, line := range strings.Split(string(b), "\n") {
		// ID parent major:minor root mount-point options... - fstype ...
		f := strings.Fields(line)
		if len(f) < 5 || !strings.HasSuffix(f[4], suffix) {
			continue
		}
		if p := unescapeMountinfo(f[4]); p != file && p != real {
			paths = append(paths, p)
		}
	}
	return paths
}

// mountedAt describes what is still mounted on file, for an error.
func mountedAt(file string) string {
	b, _ := os.ReadFile("/proc/thread-self/mountinfo")
	var lines []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, "/"+filepath.Base(file)+" ") {
			lines = append(lines, line)
		}
	}
	if len(lines) == 0 {
		return ""
	}
	return " (still mounted: " + strings.Join(lines, "; ") + ")"
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// wire creates the veth pair and assigns addresses and neighbour entries.
func (l *Lab) wire() error {
	srv, err := l.Server.netlink()
	if err != nil {
		return err
	}
	defer srv.Close()
	cli, err := l.Client.netlink()
	if err != nil {
		return err
	}
	defer cli.Close()

	// Up first, lo and the veth pair: taking a link down flushes its
	// neighbour entries, permanent ones included.
	srvLo, err := linkUp(srv, l.Server, "lo")
	if err != nil {
		return err
	}
	if _, err := linkUp(cli, l.Client, "lo"); err != nil {
		return err
	}
	srvLink, cliLink, err := veth(l.Server, l.Client, srv, cli, ServerLink, ClientLink)
	if err != nil {
		return err
	}

	if err := addAddrs(srv, srvLink, []netip.Addr{l.ServerAddr4, l.ServerAddr6}, 15, 32); err != nil {
		return err
	}
	if err := addAddrs(cli, cliLink, l.ClientAddrs4, 15, 32); err != nil {
		return err
	}
	if err := addAddrs(cli, cliLink, l.ClientAddrs6, 15, 32); err != nil {
		return err
	}
	if err := addAddrs(srv, srvLo, l.LocalAddrs4, 32, 128); err != nil {
		return err
	}
	if err := addAddrs(srv, srvLo, l.LocalAddrs6, 32, 128); err != nil {
		return err
	}

	neigh := func(h *netlink.Handle, link netlink.Link, addrs []netip.Addr, mac net.HardwareAddr) error {
		for _, a := range addrs {
			family := netlink.FAMILY_V4
			if a.Is6() {
				family = netlink.FAMILY_V6
			}
			n := &netlink.Neigh{
				LinkIndex:    link.Attrs().Index,
				Family:       family,
				State:        netlink.NUD_PERMANENT,
				IP:           a.AsSlice(),
				HardwareAddr: mac,
			}
			if err := h.NeighAdd(n); err != nil {
				return fmt.Errorf("netlab: add neighbour %s on %s: %w", a, link.Attrs().Name, err)
			}
		}
		return nil
	}
	if err := neigh(srv, srvLink, append(append([]netip.Addr(nil), l.ClientAddrs4...), l.ClientAddrs6...), cliLink.Attrs().HardwareAddr); err != nil {
		return err
	}
	return neigh(cli, cliLink, []netip.Addr{l.ServerAddr4, l.ServerAddr6}, srvLink.Attrs().HardwareAddr)
}

// linkUp finds the link name in ns (h is ns's handle) and brings it up.
func linkUp(h *netlink.Handle, ns *NS, name string) (netlink.Link, error) {
	link, err := h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("netlab: find %s in %s: %w", name, ns.Name, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("netlab: bring up %s in %s: %w", name, ns.Name, err)
	}
	return link, nil
}

// veth makes a veth pair with one end (name) in a and the other (peer) in
// b, both up, and returns their links (a's in a, b's in b). The pair is
// created by a's socket, so in a, with the peer created directly in b:
// neither end ever exists in the host namespace. NewVeth and NewLinkAttrs
// leave the queue lengths at the kernel's defaults instead of zero.
func veth(a, b *NS, ha, hb *netlink.Handle, name, peer string) (netlink.Link, netlink.Link, error) {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	v := netlink.NewVeth(attrs)
	v.PeerName = peer
	b.mu.RLock()
	v.PeerNamespace = netlink.NsFd(b.h) // read by the kernel during LinkAdd
	err := ha.LinkAdd(v)
	b.mu.RUnlock()
	if err != nil {
		return nil, nil, fmt.Errorf("netlab: create veth %s/%s: %w", name, peer, err)
	}
	la, err := linkUp(ha, a, name)
	if err != nil {
		return nil, nil, err
	}
	lb, err := linkUp(hb, b, peer)
	if err != nil {
		return nil, nil, err
	}
	return la, lb, nil
}

// addAddrs puts addrs on link, IPv4 ones with prefix length bits4 and IPv6
// ones with bits6.
func addAddrs(h *netlink.Handle, link netlink.Link, addrs []netip.Addr, bits4, bits6 int) error {
	for _, a := range addrs {
		bits := bits4
		if a.Is6() {
			bits = bits6
		}
		// NODAD: an IPv6 address is usable at once, instead of after
		// duplicate address detection, so nobody has to sleep.
		addr := &netlink.Addr{
			IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())},
			Flags: unix.IFA_F_NODAD,
		}
		if err := h.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("netlab: add %s/%d to %s: %w", a, bits, link.Attrs().Name, err)
		}
	}
	return nil
}

// netlink returns a rtnetlink handle whose socket lives in ns.
//
// The socket is opened on a thread switched by Do rather than by
// netlink.NewHandleAt, whose thread switch unlocks the thread even when
// switching back failed. The handle has a NETLINK_ROUTE socket only: for
// any other family the netlink package would silently open a fresh socket
// on the calling thread, i.e. in the host namespace, so only rtnetlink
// operations may be used with it.
func (ns *NS) netlink() (*netlink.Handle, error) {
	var h *netlink.Handle
	err := ns.Do(func() error {
		var err error
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netlab: netlink socket in %s: %w", ns.Name, err)
	}
	return h, nil
}

// The watchdog.
//
// Lab.Close never runs if the process dies first: a crash, a go test
// timeout (which panics), ^C, SIGKILL. The names would then outlive it in
// /var/run/netns, holding the namespaces alive. So the first namespace a
// process creates starts a watchdog: the same executable, re-executed with
// watchdogEnv set, which init below turns into runWatchdog before anything
// else (TestMain, main) runs. The process writes "+ name" to the watchdog's
// stdin before a name can hold a namespace and "- name" after Close removed
// it; when the pipe reaches EOF, because the process has exited in whatever
// way, the watchdog removes the names still listed and exits.
//
// The watchdog runs in a process group of its own, so the ^C or the
// group-wide signal (timeout(1)) that kills a test run does not kill it
// too, and ignores the signals that are usually meant for the whole run.
// It holds no namespace fd (they are all O_CLOEXEC), so it never keeps a
// lab alive; it does live in the network namespace of the thread that
// started it, which is why New must not be called from inside NS.Do.

const watchdogEnv = "IPCLUSTER_NETLAB_WATCHDOG"

// guard is the process's side of the watchdog.
var guard struct {
	mu sync.Mutex
	// w is the write end of the watchdog's stdin. It must stay reachable
	// for the life of the process: if it were garbage collected, its
	// finalizer would close it, and the watchdog would take that EOF for
	// the end of the process and remove every live lab.
	w     *os.File
	proc  *os.Process         // for tests
	names map[string]struct{} // names to resend to a restarted watchdog
}

func init() {
	if _, ok := os.LookupEnv(watchdogEnv); !ok {
		return
	}
	// Not to be inherited by anything this process might start.
	os.Unsetenv(watchdogEnv)
	var st unix.Stat_t
	if err := unix.Fstat(0, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return // not started by startWatchdog: carry on as a normal program
	}
	os.Exit(runWatchdog(os.Stdin))
}

// runWatchdog reads "+ name" and "- name" lines until EOF, then removes the
// names still listed. It returns the process exit code.
func runWatchdog(in io.Reader) int {
	signal.Ignore(syscall.SIGINT, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGQUIT)
	names := map[string]struct{}{}
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		op, name, _ := strings.Cut(sc.Text(), " ")
		if !validName(name) {
			continue // never touch anything but our own names
		}
		switch op {
		case "+":
			names[name] = struct{}{}
		case "-":
			delete(names, name)
		}
	}
	code := 0
	for name := range names {
		if err := removeNamed(name); err != nil {
			fmt.Fprintln(os.Stderr, "netlab watchdog:", err)
			code = 1
		}
	}
	return code
}

// validName reports whether name is ipct- and 8 lower-case hex digits.
func validName(name string) bool {
	hexPart, ok := strings.CutPrefix(name, namePrefix)
	if !ok || len(hexPart) != 8 {
		return false
	}
	for _, c := range hexPart {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// ensureWatchdog starts the watchdog unless it is running.
func ensureWatchdog() error {
	guard.mu.Lock()
	defer guard.mu.Unlock()
	if guard.w != nil {
		return nil
	}
	return startWatchdog()
}

// watch tells the watchdog to remove name if this process dies, starting
// another watchdog if the first has died.
func watch(name string) error {
	guard.mu.Lock()
	defer guard.mu.Unlock()
	if guard.names == nil {
		guard.names = map[string]struct{}{}
	}
	guard.names[name] = struct{}{}
	if guard.w != nil {
		if _, err := guard.w.WriteString("+ " + name + "\n"); err == nil {
			return nil
		}
		// EPIPE: the watchdog is gone. Start another, which is told
		// every name, this one included.
		guard.w.Close()
		guard.w = nil
	}
	if err := startWatchdog(); err != nil {
		delete(guard.names, name)
		return err
	}
	return nil
}

// unwatch tells the watchdog that name is gone. Best-effort: a watchdog
// that never hears of it finds nothing to remove.
func unwatch(name string) {
	guard.mu.Lock()
	defer guard.mu.Unlock()
	delete(guard.names, name)
	if guard.w != nil {
		_, _ = guard.w.WriteString("- " + name + "\n")
	}
}

// startWatchdog starts a watchdog and sends it every name in guard.names.
// guard.mu must be held.
func startWatchdog() error {
	r, w, err := os.Pipe() // both O_CLOEXEC: no other child inherits them
	if err != nil {
		return fmt.Errorf("netlab: watchdog pipe: %w", err)
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = []string{"netlab-watchdog"}
	cmd.Env = append(os.Environ(), watchdogEnv+"="+strconv.Itoa(os.Getpid()))
	cmd.Stdin = r
	// Stderr for its complaints. It holds that open (and so keeps go test
	// waiting) only for the moment it outlives this process.
	cmd.Stderr = os.Stderr
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	r.Close() // only the watchdog may hold the read end, so writes see EPIPE once it is gone
	if err != nil {
		w.Close()
		return fmt.Errorf("netlab: start watchdog: %w", err)
	}
	go cmd.Wait() // reap it, should it die before this process
	guard.proc = cmd.Process
	var b strings.Builder
	for name := range guard.names {
		b.WriteString("+ " + name + "\n")
	}
	if _, err := w.WriteString(b.String()); err != nil {
		w.Close()
		return fmt.Errorf("netlab: watchdog: %w", err)
	}
	guard.w = w
	return nil
}
