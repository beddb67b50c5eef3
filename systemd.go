//go:build linux

package ipcluster

// systemd: readiness, reloads, stops and the watchdog, told over
// sd_notify(3). Everything here is a no-op unless the master was started
// with NOTIFY_SOCKET, as a Type=notify unit's process is.
//
// The messages follow the cluster, not one process:
//
//	READY=1       the cluster serves every slot and no deploy is rolling
//	              (first start, then the end of every deploy: commit,
//	              rollback, a successor that never took over)
//	RELOADING=1   a deploy starts: SIGHUP (a new master), or a rolling one
//	STOPPING=1    a graceful stop begins
//	WATCHDOG=1    every half WATCHDOG_USEC, from the master's loop
//	MAINPID=N     with every READY=1 (N is the sender), and from a master
//	              handing the cluster over (N is the new master)
//
// A deploy replaces the master process, so the unit's main PID moves: the
// old master names its successor before it exits (systemd reads the
// notify socket before SIGCHLD, so the main PID has moved by the time it
// sees the old one exit), and the successor repeats it with its READY=1.
// systemd accepts messages from the successor only with NotifyAccess=all.
//
// Workers never talk to systemd: NOTIFY_SOCKET and the watchdog variables
// are kept out of their environment (a worker's READY=1 or MAINPID would
// confuse the unit's state). The successor started on SIGHUP gets
// NOTIFY_SOCKET and WATCHDOG_USEC back; not WATCHDOG_PID, which names the
// old master and would turn the successor's watchdog off.

import (
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// The environment of a process systemd starts with Type=notify and
// WatchdogSec (see sd_notify(3), sd_watchdog_enabled(3)).
const (
	envNotifySocket = "NOTIFY_SOCKET"
	envWatchdogUSec = "WATCHDOG_USEC"
	envWatchdogPID  = "WATCHDOG_PID"
)

// notifier sends sd_notify messages in order from its own goroutine: a
// send to the notify socket can block (systemd busy, its queue full), and
// the master's loop must never wait on it. Messages beyond notifyQueue
// waiting are dropped; errors are logged at debug and otherwise ignored.
type notifier struct {
	log      *slog.Logger
	socket   string        // NOTIFY_SOCKET; "" when not started by systemd
	watchdog time.Duration // WATCHDOG_USEC meant for this process; 0 for none

	queue chan string
	done  chan struct{}
	once  sync.Once
}

const notifyQueue = 32

// newNotifier reads the environment of the current process.
func newNotifier(log *slog.Logger) *notifier {
	n := &notifier{log: log, socket: os.Getenv(envNotifySocket), done: make(chan struct{})}
	if n.socket == "" {
		close(n.done)
		return n
	}
	// WATCHDOG_PID, if set, must be us: a WATCHDOG_USEC inherited from a
	// parent meant for another process is ignored.
	wd, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("ignoring the systemd watchdog settings", "err", err)
	}
	n.watchdog = wd
	n.queue = make(chan string, notifyQueue)
	go n.loop()
	return n
}

func (n *notifier) loop() {
	defer close(n.done)
	for state := range n.queue {
		if _, err := daemon.SdNotify(false, state); err != nil {
			n.log.Debug("sd_notify", "socket", n.socket, "state", state, "err", err)
		}
	}
}

// send queues one message of newline-separated assignments. A nil
// notifier (a master whose loop never ran) sends nothing.
func (n *notifier) send(assignments ...string) {
	if n == nil || n.socket == "" {
		return
	}
	assignments = slices.DeleteFunc(assignments, func(a string) bool { return a == "" })
	state := strings.Join(assignments, "\n")
	select {
	case n.queue <- state:
	default:
		n.log.Debug("sd_notify queue full; message dropped", "state", state)
	}
}

// close sends what is queued, for at most a second, and stops: a master
// that hands over returns from Run right after naming its successor, and
// that message must leave before the process exits. Safe to call more
// than once.
func (n *notifier) close() {
	n.once.Do(func() {
		if n.queue != nil {
			close(n.queue)
		}
	})
	select {
	case <-n.done:
	case <-time.After(time.Second):
		n.log.Debug("sd_notify: messages left unsent at exit")
	}
}

// ping resets systemd's watchdog timer.
func (n *notifier) ping() { n.send(daemon.SdNotifyWatchdog) }

// watchdogTicker ticks every half WATCHDOG_USEC, or never. The pings are
// sent from the master's loop, so a loop that hangs stops them and systemd
// restarts the master (the workers survive with KillMode=process).
func (n *notifier) watchdogTicker() (<-chan time.Time, func()) {
	if n.watchdog <= 0 {
		return nil, func() {}
	}
	t := time.NewTicker(n.watchdog / 2)
	return t.C, t.Stop
}

// successorEnv is what a successor master needs to go on talking to
// systemd in this master's stead.
func (n *notifier) successorEnv() []string {
	if n == nil || n.socket == "" {
		return nil
	}
	env := []string{envNotifySocket + "=" + n.socket}
	if n.watchdog > 0 {
		env = append(env, envWatchdogUSec+"="+strconv.FormatInt(n.watchdog.Microseconds(), 10))
	}
	return env
}

// notifyReady tells systemd the cluster serves, once it is ready and no
// deploy is under way (a deploy's end calls it again).
func (m *master) notifyReady() {
	if m.phase == phaseStarting || m.dep != nil || m.successor != nil || m.phase == phaseStopping {
		return
	}
	what := "serving"
	if why := m.notReady(); why != "" {
		what = "not ready: " + why
	}
	m.sd.send(daemon.SdNotifyReady, "MAINPID="+strconv.Itoa(os.Getpid()),
		"STATUS="+m.statusLine(what))
}

// notifyReloading tells systemd a deploy started: it shows the unit as
// reloading until the next READY=1.
func (m *master) notifyReloading(what string) {
	// MONOTONIC_USEC lets a Type=notify-reload unit (systemd 253 and
	// later) match this message to the reload it asked for.
	m.sd.send(daemon.SdNotifyReloading, strings.TrimSuffix(daemon.SdNotifyMonotonicUsec(), "\n"), "STATUS=deploying: "+what)
}

// notifyStopping tells systemd a graceful stop began.
func (m *master) notifyStopping(why string) {
	m.sd.send(daemon.SdNotifyStopping, "STATUS=stopping: "+why)
}

// notifyHandedOver names the new master as the unit's main process,
// before this one exits.
func (m *master) notifyHandedOver(pid int) {
	m.sd.send("MAINPID="+strconv.Itoa(pid), "STATUS=handed over to master pid "+strconv.Itoa(pid))
}

func (m *master) statusLine(what string) string {
	return what + ": " + strconv.Itoa(len(m.slots)) + " slots, build " + m.target.build +
		", master generation " + strconv.Itoa(m.gen)
}
