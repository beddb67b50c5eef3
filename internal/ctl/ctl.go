// Package ctl is ipclusterctl: the operator's command line for a running
// cluster, spoken over the master's control socket. It lives here, not in
// cmd/ipclusterctl, so that the library's tests can run it against real
// masters.
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

const usage = `usage: ipclusterctl [flags] <command> [args]

commands:
  status [--json]     slots, workers, the deploy and the rules in force
  deploy              deploy the binary on disk (as kill -HUP <master>); waits
                      for the outcome, and fails unless it is committed
  restart             restart every worker with the same build (as SIGUSR2); waits
  retire <slot|pid>   retire one active worker (a number below the slot count
                      is a slot, any other a pid); waits for its slot to move
  resize <workers>    change the number of slots (a power of two); waits
  kill-retired        kill every retired worker (as SIGUSR1 to the master)
  drain               take this host out of the front tier: not ready (/readyz
                      503), BGP announcements withdrawn; held connections
                      stay. Waits until the routes are withdrawn
  undrain             return it: ready and announced again once every slot
                      is served; waits
  stop                stop the cluster gracefully (as SIGTERM); waits
  pprof <slot|pid:N> [profile] [-o file] [-seconds N]
                      write a worker's profile to a file: heap (the default),
                      goroutine, allocs, block, mutex, threadcreate, profile
                      (CPU, -seconds, default 30) or trace; a number is a
                      slot (its active worker), pid:N any worker. Default
                      file: <cluster>-slot<s>-pid<p>-<profile>.pb.gz
  metrics <slot|pid:N>
                      print a worker's own /metrics (its operator handler)

exit status:
  0  done
  1  failed otherwise (an unexpected answer)
  2  bad usage
  3  no master: no cluster under -rundir, no control socket, or nobody
     listening on it (the master died; its workers serve on)
  4  permission denied: run as the master's user or root
  5  the master refused the request (say, a deploy already under way, or
     a resize to a number that is not a power of two); it says why
  6  the deploy or restart rolled back: the old build serves every slot
  7  the deploy failed: the new master did not take over (its error is
     printed); the running master serves on, untouched
  8  gave up waiting (-timeout) for the command to complete

flags:
`

// Exit statuses, one per kind of failure (see usage).
const (
	exitOK           = 0
	exitFailed       = 1
	exitUsage        = 2
	exitNoMaster     = 3
	exitDenied       = 4
	exitRefused      = 5
	exitRolledBack   = 6
	exitDeployFailed = 7
	exitTimeout      = 8
)

// Main runs the command line args and returns the exit status (see usage
// and the exit* constants).
func Main(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("ipclusterctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	name := fs.String("name", "", "cluster name (default: the only cluster under -rundir)")
	runDir := fs.String("rundir", proto.DefaultRunDir, "the cluster's Config.RunDir")
	socket := fs.String("socket", "", "control socket path (default: <rundir>/<name>/control.sock)")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long to wait for a command to complete")
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return exitUsage
	}
	c := &cli{out: stdout, timeout: *timeout}
	var err error
	if c.socket, c.name, err = findSocket(*socket, *runDir, *name); err != nil {
		fmt.Fprintln(stderr, "ipclusterctl:", err)
		return exitCode(err)
	}
	cmd, rest := fs.Arg(0), fs.Args()[1:]
	switch cmd {
	case "status":
		err = c.status(rest)
	case "deploy":
		err = c.deploy()
	case "restart":
		err = c.restart()
	case "retire":
		err = c.retire(rest)
	case "resize":
		err = c.resize(rest)
	case "drain", "undrain":
		err = c.drain(cmd == "drain")
	case "kill-retired":
		err = c.killRetired()
	case "stop":
		err = c.stop()
	case "pprof":
		err = c.pprof(rest)
	case "metrics":
		err = c.metrics(rest)
	default:
		fmt.Fprintf(stderr, "ipclusterctl: unknown command %q\n", cmd)
		fs.Usage()
		return exitUsage
	}
	if err != nil {
		fmt.Fprintln(stderr, "ipclusterctl:", err)
	}
	return exitCode(err)
}

// Kinds of failure, each with its exit status (exitCode). Refusals of a
// request wrap proto.ErrRefused.
var (
	errNoMaster     = errors.New("no master")
	errDenied       = errors.New("permission denied")
	errRolledBack   = errors.New("rolled back")
	errDeployFailed = errors.New("deploy failed")
	errTimeout      = errors.New("gave up waiting")
)

func exitCode(err error) int {
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		return exitUsage
	case errors.Is(err, errNoMaster):
		return exitNoMaster
	case errors.Is(err, errDenied):
		return exitDenied
	case errors.Is(err, errRolledBack):
		return exitRolledBack
	case errors.Is(err, errDeployFailed):
		return exitDeployFailed
	case errors.Is(err, errTimeout):
		return exitTimeout
	case errors.Is(err, proto.ErrRefused):
		return exitRefused
	}
	return exitFailed
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

// findSocket picks the control socket: given, or under runDir for name, or
// for the only cluster there.
func findSocket(socket, runDir, name string) (string, string, error) {
	if socket != "" {
		return socket, name, nil
	}
	if name == "" {
		ents, err := os.ReadDir(runDir)
		if err != nil {
			return "", "", fmt.Errorf("%w: cannot list %s (%v): is a master running? Pass -rundir (the cluster's Config.RunDir) and -name", errNoMaster, runDir, err)
		}
		var names []string
		for _, e := range ents {
			if e.IsDir() {
				names = append(names, e.Name())
			}
		}
		switch len(names) {
		case 0:
			return "", "", fmt.Errorf("%w: no cluster under %s: is a master running? Pass -rundir (the cluster's Config.RunDir)", errNoMaster, runDir)
		case 1:
			name = names[0]
		default:
			return "", "", usageError{fmt.Sprintf("several clusters under %s (%s): pick one with -name", runDir, strings.Join(names, ", "))}
		}
	}
	return proto.SocketPath(runDir, name), name, nil
}

type cli struct {
	socket, name string
	out          io.Writer
	timeout      time.Duration
}

// dial connects to the master, turning the usual failures into advice.
func (c *cli) dial(ctx context.Context) (*proto.Client, error) {
	cl, err := proto.Dial(ctx, c.socket, c.name)
	switch {
	case err == nil:
		return cl, nil
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("%w is running cluster %q: %s does not exist (start the program, or pass -rundir and -name)", errNoMaster, c.name, c.socket)
	case errors.Is(err, syscall.EACCES) || errors.Is(err, os.ErrPermission):
		return nil, fmt.Errorf("%w connecting to %s: run ipclusterctl as the master's user or root", errDenied, c.socket)
	case errors.Is(err, syscall.ECONNREFUSED):
		return nil, fmt.Errorf("%w listens on %s: its master died; its workers keep serving, and starting the program again adopts them", errNoMaster, c.socket)
	case errors.Is(err, proto.ErrRefused) && strings.Contains(err.Error(), deniedReason):
		return nil, fmt.Errorf("%w by the master at %s (run ipclusterctl as the master's user or root): %w", errDenied, c.socket, err)
	case errors.Is(err, proto.ErrRefused):
		return nil, fmt.Errorf("the master at %s refused to talk: %w", c.socket, err)
	}
	return nil, fmt.Errorf("%w: connect to %s: %w", errNoMaster, c.socket, err)
}

// deniedReason begins the master's refusal of a peer whose user it does
// not serve (control.go: admit, onHello).
const deniedReason = "permission denied"

// request sends one request on a fresh connection.
func (c *cli) request(typ string, body any) (proto.Msg, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := c.dial(ctx)
	if err != nil {
		return proto.Msg{}, err
	}
	defer cl.Close()
	return cl.Do(ctx, typ, body)
}

func (c *cli) getStatus() (*proto.Status, error) {
	m, err := c.request(proto.TypeStatus, nil)
	if err != nil {
		return nil, err
	}
	st, ok := m.Body.(*proto.Status)
	if !ok {
		return nil, fmt.Errorf("master answered status with %q", m.Type)
	}
	return st, nil
}

// wait polls the status until done says the command is over (ok or not).
// Connection failures are retried: during a deploy the master changes.
func (c *cli) wait(what string, done func(*proto.Status) (bool, error)) error {
	deadline := time.Now().Add(c.timeout)
	var last error
	for time.Now().Before(deadline) {
		st, err := c.getStatus()
		if err == nil {
			if over, err := done(st); over {
				return err
			}
		} else {
			last = err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%w for %s after %s (last error: %v)", errTimeout, what, c.timeout, last)
}

func (c *cli) status(args []string) error {
	jsonOut := false
	for _, a := range args {
		switch a {
		case "--json", "-json":
			jsonOut = true
		default:
			return usageError{fmt.Sprintf("status: unknown argument %q", a)}
		}
	}
	st, err := c.getStatus()
	if err != nil {
		return err
	}
	if jsonOut {
		enc := json.NewEncoder(c.out)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	writeStatus(c.out, st, time.Now())
	return nil
}

// deploy asks for a deploy and follows it to its end, across the change of
// master.
func (c *cli) deploy() error {
	// The status before the request: a new master that fails at once
	// may have failed before the first status after it.
	before, err := c.getStatus()
	if err != nil {
		return err
	}
	failed := func(st *proto.Status) error {
		if st.DeployPhase == proto.PhaseFailed && st.Successor == 0 && st.Deploy != before.Deploy {
			return fmt.Errorf("%w: %s", errDeployFailed, strings.TrimPrefix(st.Deploy, "failed: "))
		}
		return nil
	}
	m, err := c.request(proto.TypeDeploy, nil)
	if err != nil {
		// Refused because the new master could not even be started: a
		// failed deploy too.
		if st, serr := c.getStatus(); errors.Is(err, proto.ErrRefused) && serr == nil && failed(st) != nil {
			return failed(st)
		}
		return err
	}
	succ := m.Body.(*proto.Deploy).SuccessorPID
	fmt.Fprintf(c.out, "deploy: new master pid %d started; waiting for it to take over\n", succ)
	tookOver := false
	return c.wait("the deploy", func(st *proto.Status) (bool, error) {
		if st.MasterPID != succ {
			if err := failed(st); err != nil {
				return true, err
			}
			return false, nil
		}
		if !tookOver {
			tookOver = true
			fmt.Fprintf(c.out, "deploy: master pid %d took over (generation %d, build %s)\n", st.MasterPID, st.Generation, st.Build)
		}
		switch st.DeployPhase {
		case proto.PhaseCommitted:
			fmt.Fprintf(c.out, "deploy: %s\n", st.Deploy)
			return true, nil
		case proto.PhaseRolledBack:
			return true, fmt.Errorf("deploy %w%s", errRolledBack, strings.TrimPrefix(st.Deploy, "rolled back"))
		case "":
			if serving(st) {
				fmt.Fprintln(c.out, "deploy: every worker already runs this build; nothing to roll")
				return true, nil
			}
		}
		return false, nil
	})
}

// serving reports whether the cluster is ready, or would be but for a
// drain (the master names a drain last among its reasons).
func serving(st *proto.Status) bool {
	return st.Ready || st.NotReady == proto.NotReadyDrained
}

func (c *cli) restart() error {
	before, err := c.getStatus()
	if err != nil {
		return err
	}
	if _, err := c.request(proto.TypeRestart, nil); err != nil {
		return err
	}
	fmt.Fprintln(c.out, "restart: rolling every worker")
	return c.wait("the restart", func(st *proto.Status) (bool, error) {
		if st.Deploy == before.Deploy {
			return false, nil
		}
		switch st.DeployPhase {
		case proto.PhaseCommitted:
			fmt.Fprintf(c.out, "restart: %s\n", st.Deploy)
			return true, nil
		case proto.PhaseRolledBack:
			return true, fmt.Errorf("restart %w%s", errRolledBack, strings.TrimPrefix(st.Deploy, "rolled back"))
		}
		return false, nil
	})
}

func (c *cli) retire(args []string) error {
	if len(args) != 1 {
		return usageError{"retire: want one slot or pid"}
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 0 {
		return usageError{fmt.Sprintf("retire: %q is not a slot or pid", args[0])}
	}
	st, err := c.getStatus()
	if err != nil {
		return err
	}
	req := &proto.RetireOne{Slot: -1, PID: n}
	if n < len(st.Slots) {
		req = &proto.RetireOne{Slot: n}
	}
	m, err := c.request(proto.TypeRetireOne, req)
	if err != nil {
		return err
	}
	got := m.Body.(*proto.RetireOne)
	fmt.Fprintf(c.out, "retire: worker %d of slot %d is being replaced\n", got.PID, got.Slot)
	return c.wait("the retirement", func(st *proto.Status) (bool, error) {
		if a := st.Slots[got.Slot].Active; a != 0 && a != got.PID {
			fmt.Fprintf(c.out, "retire: slot %d now served by worker %d; worker %d drains\n", got.Slot, a, got.PID)
			return true, nil
		}
		return false, nil
	})
}

// drain drains (on) or undrains the host and waits for its announcements
// to follow, when it has a BGP speaker.
func (c *cli) drain(on bool) error {
	if _, err := c.request(proto.TypeDrain, &proto.Drain{On: on}); err != nil {
		return err
	}
	what := map[bool]string{true: "drained", false: "undrained"}[on]
	fmt.Fprintf(c.out, "%s: %s\n", what, map[bool]string{true: "not ready; held connections stay", false: "ready again once every slot is served"}[on])
	return c.wait("the announcements to follow", func(st *proto.Status) (bool, error) {
		if st.BGP == nil {
			return true, nil
		}
		if st.BGP.Announced == !on {
			fmt.Fprintf(c.out, "%s: BGP announcements of %s %s\n", what, strings.Join(st.BGP.Addrs, ", "), map[bool]string{true: "withdrawn", false: "announced"}[on])
			return true, nil
		}
		return false, nil
	})
}

func (c *cli) resize(args []string) error {
	if len(args) != 1 {
		return usageError{"resize: want the new number of workers"}
	}
	n, err := strconv.Atoi(args[0])
	if err != nil {
		return usageError{fmt.Sprintf("resize: %q is not a number", args[0])}
	}
	if _, err := c.request(proto.TypeResize, &proto.Resize{Workers: n}); err != nil {
		return err
	}
	fmt.Fprintf(c.out, "resize: to %d workers\n", n)
	return c.wait("the resize", func(st *proto.Status) (bool, error) {
		if len(st.Slots) != n || !serving(st) {
			return false, nil
		}
		for _, s := range st.Slots {
			if s.Active == 0 {
				return false, nil
			}
		}
		fmt.Fprintf(c.out, "resize: %d slots served\n", n)
		return true, nil
	})
}

func (c *cli) killRetired() error {
	m, err := c.request(proto.TypeKillRetired, nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.out, "kill-retired: killed %d retired workers\n", m.Body.(*proto.Count).N)
	return nil
}

func (c *cli) stop() error {
	if _, err := c.request(proto.TypeStop, nil); err != nil {
		return err
	}
	fmt.Fprintln(c.out, "stop: the master is stopping; waiting for its workers to finish")
	deadline := time.Now().Add(c.timeout)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(c.socket); errors.Is(err, os.ErrNotExist) {
			fmt.Fprintln(c.out, "stop: stopped")
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%w: the master has not finished stopping after %s", errTimeout, c.timeout)
}

// writeStatus prints the status as a table of workers, then the rules.
func writeStatus(w io.Writer, st *proto.Status, now time.Time) {
	// The master's own verdict, as its /readyz gives it.
	ready := "not ready"
	switch {
	case st.Ready:
		ready = "ready"
	case st.NotReady != "":
		ready += ": " + st.NotReady
	}
	fmt.Fprintf(w, "cluster %s  master pid %d  generation %d  build %s  %s\n", st.Cluster, st.MasterPID, st.Generation, st.Build, ready)
	if st.Deploy != "" {
		fmt.Fprintf(w, "deploy: %s\n", st.Deploy)
	}
	if st.Backend != "" {
		fmt.Fprintf(w, "backend: %s (%s)\n", st.Backend, st.BackendReason)
	}
	if st.Drained {
		fmt.Fprintln(w, "drained: out of the front tier until ipclusterctl undrain")
	}
	if a := st.Autoscale; a != nil {
		var targets []string
		if a.ConnsPerWorker > 0 {
			targets = append(targets, fmt.Sprintf("%d connections", a.ConnsPerWorker))
		}
		if a.CPUPerWorker > 0 {
			targets = append(targets, fmt.Sprintf("%.2f cores", a.CPUPerWorker))
		}
		fmt.Fprintf(w, "autoscale: %d to %d workers, targets %s per worker", a.MinWorkers, a.MaxWorkers, strings.Join(targets, " and "))
		switch {
		case a.Action != "" && a.Refused != "":
			fmt.Fprintf(w, "; would %s %d → %d at %s, refused: %s", a.Action, a.From, a.To, time.Unix(0, int64(a.At*1e9)).Format(time.TimeOnly), a.Refused)
		case a.Action != "":
			fmt.Fprintf(w, "; %s %d → %d at %s: %s", a.Action, a.From, a.To, time.Unix(0, int64(a.At*1e9)).Format(time.TimeOnly), a.Reason)
		}
		fmt.Fprintln(w)
	}
	if b := st.BGP; b != nil {
		state := "withdrawn"
		if b.Announced {
			state = "announced"
		}
		fmt.Fprintf(w, "bgp: %s %s since %s\n", strings.Join(b.Addrs, ", "), state, time.Unix(0, int64(b.Since*1e9)).Format(time.TimeOnly))
		for _, p := range b.Peers {
			fmt.Fprintf(w, "  peer %s (AS %d): %s\n", p.Addr, p.ASN, p.State)
		}
	}
	fmt.Fprintln(w)
	workers := slices.Clone(st.Workers)
	active := map[int]bool{}
	for _, s := range st.Slots {
		active[s.Active] = true
	}
	slices.SortStableFunc(workers, func(a, b proto.WorkerStatus) int {
		if active[a.PID] != active[b.PID] {
			if active[a.PID] {
				return -1
			}
			return 1
		}
		if a.Slot != b.Slot {
			return a.Slot - b.Slot
		}
		return a.PID - b.PID
	})
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SLOT\tPID\tGEN\tBUILD\tSTATE\tUPTIME\tRSS\tLAG\tCONNS\tREQUESTS")
	for _, wk := range workers {
		slot := strconv.Itoa(wk.Slot)
		if wk.Slot < 0 {
			slot = "-"
		}
		lag, conns, reqs := "-", "-", "-"
		if s := wk.Stats; s != nil {
			lag = fmtDuration(time.Duration(s.LagSec * float64(time.Second)))
			conns = strconv.FormatInt(s.Connections, 10)
			reqs = appRequests(s.App)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", slot, wk.PID, wk.Generation, dash(wk.Build), stateName(wk),
			fmtDuration(time.Duration(wk.UptimeSec*float64(time.Second))), fmtBytes(wk.RSSBytes), lag, conns, reqs)
	}
	tw.Flush()
	if len(st.HeapSnapshots) > 0 {
		fmt.Fprintln(w, "\nheap snapshots (latest last; go tool pprof -top <diff>):")
		for _, h := range st.HeapSnapshots {
			what := h.Diff
			switch {
			case h.Error != "":
				what = "failed: " + h.Error
			case what == "":
				what = h.End + " (no start)"
			}
			fmt.Fprintf(w, "  pid %d slot %d (%s): %s\n", h.PID, h.Slot, dash(h.Cause), what)
		}
	}
	fams := make([]string, 0, len(st.Rules))
	for f := range st.Rules {
		fams = append(fams, f)
	}
	slices.Sort(fams)
	for _, f := range fams {
		fmt.Fprintf(w, "\nrules in force (%s):\n", f)
		for _, line := range strings.Split(st.Rules[f], "\n") {
			if line != "" {
				fmt.Fprintf(w, "  %s\n", line)
			}
		}
	}
}

// stateName is the operator's view of a worker's state: a retired worker
// still holding connections is DRAINING.
func stateName(w proto.WorkerStatus) string {
	switch {
	case w.Unresponsive:
		return "UNRESPONSIVE"
	case w.State == "retired" && w.Stats != nil && w.Stats.Connections > 0:
		return "DRAINING"
	}
	return strings.ToUpper(w.State)
}

// appRequests is the "requests" figure of the application's stats, if it
// reports one.
func appRequests(app json.RawMessage) string {
	var v struct {
		Requests *json.Number `json:"requests"`
	}
	if len(app) == 0 || json.Unmarshal(app, &v) != nil || v.Requests == nil {
		return "-"
	}
	return v.Requests.String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func fmtDuration(d time.Duration) string {
	switch {
	case d >= time.Hour:
		return d.Round(time.Minute).String()
	case d >= time.Minute:
		return d.Round(time.Second).String()
	case d >= time.Second:
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(10 * time.Microsecond).String()
}

func fmtBytes(b uint64) string {
	if b == 0 {
		return "-"
	}
	return strconv.FormatFloat(float64(b)/(1<<20), 'f', 1, 64) + "MiB"
}
