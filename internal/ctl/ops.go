package ctl

// pprof and metrics: a worker's operator endpoints, reached through the
// operator socket the status names (RunDir/<Name>/ops/...), not through
// the master's HTTPAddr, which a cluster may not serve.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// profiles are the names pprof takes: the runtime's profiles, then the CPU
// profile and the execution trace, which take -seconds.
var profiles = []string{"heap", "goroutine", "allocs", "block", "mutex", "threadcreate", "profile", "trace"}

// target is a worker named on the command line: a slot number (its
// active worker) or pid:<pid> (any worker).
type target struct {
	slot, pid int // pid 0: by slot
}

func parseTarget(cmd, s string) (target, error) {
	if rest, ok := strings.CutPrefix(s, "pid:"); ok {
		pid, err := strconv.Atoi(rest)
		if err != nil || pid <= 0 {
			return target{}, usageError{fmt.Sprintf("%s: %q is not a pid (pid:<pid>)", cmd, s)}
		}
		return target{slot: -1, pid: pid}, nil
	}
	slot, err := strconv.Atoi(s)
	if err != nil || slot < 0 {
		return target{}, usageError{fmt.Sprintf("%s: %q is not a slot number nor pid:<pid>", cmd, s)}
	}
	return target{slot: slot}, nil
}

// find returns the worker t names in st.
func (t target) find(st *proto.Status) (*proto.WorkerStatus, error) {
	pid := t.pid
	if pid == 0 {
		if t.slot >= len(st.Slots) {
			return nil, fmt.Errorf("no slot %d: the cluster has slots 0..%d", t.slot, len(st.Slots)-1)
		}
		if pid = st.Slots[t.slot].Active; pid == 0 {
			return nil, fmt.Errorf("slot %d has no active worker now; name a worker as pid:<pid> (see status)", t.slot)
		}
	}
	i := slices.IndexFunc(st.Workers, func(w proto.WorkerStatus) bool { return w.PID == pid })
	if i < 0 {
		var pids []string
		for _, w := range st.Workers {
			pids = append(pids, strconv.Itoa(w.PID))
		}
		return nil, fmt.Errorf("no worker with pid %d; the workers are %s", pid, strings.Join(pids, ", "))
	}
	w := &st.Workers[i]
	if w.OperatorSocket == "" {
		return nil, fmt.Errorf("worker pid %d has no operator socket (spawned by a master of an earlier release, or the socket could not be made: see the master's log)", w.PID)
	}
	return w, nil
}

// fetch GETs path from a worker's operator socket.
func fetch(w *proto.WorkerStatus, path string, timeout time.Duration) (*http.Response, error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", w.OperatorSocket)
		},
		DisableKeepAlives:     true,
		ResponseHeaderTimeout: timeout,
	}
	resp, err := (&http.Client{Transport: tr, Timeout: timeout + time.Minute}).Get("http://worker" + path)
	switch {
	case err == nil:
	case errors.Is(err, syscall.EACCES) || errors.Is(err, os.ErrPermission):
		return nil, fmt.Errorf("%w connecting to %s: run ipclusterctl as the master's user or root", errDenied, w.OperatorSocket)
	default:
		return nil, fmt.Errorf("worker pid %d at %s: %w", w.PID, w.OperatorSocket, err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		return nil, fmt.Errorf("worker pid %d answered %s: %s", w.PID, resp.Status, strings.TrimSpace(string(b)))
	}
	return resp, nil
}

// pprof: pprof <slot|pid:N> [profile] [-o file] [-seconds N]
func (c *cli) pprof(args []string) error {
	var pos []string
	out, seconds := "", 0
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "-o" || a == "--o" || a == "-seconds" || a == "--seconds":
			if i+1 >= len(args) {
				return usageError{fmt.Sprintf("pprof: %s needs a value", a)}
			}
			i++
			if strings.TrimLeft(a, "-") == "o" {
				out = args[i]
				break
			}
			n, err := strconv.Atoi(args[i])
			if err != nil || n < 1 || n > 300 {
				return usageError{fmt.Sprintf("pprof: -seconds %q: want 1 to 300", args[i])}
			}
			seconds = n
		case strings.HasPrefix(a, "-") && a != "-":
			return usageError{fmt.Sprintf("pprof: unknown flag %q (want -o file, -seconds N)", a)}
		default:
			pos = append(pos, a)
		}
	}
	if len(pos) < 1 || len(pos) > 2 {
		return usageError{"pprof: want <slot|pid:N> [profile]"}
	}
	t, err := parseTarget("pprof", pos[0])
	if err != nil {
		return err
	}
	name := "heap"
	if len(pos) == 2 {
		name = pos[1]
	}
	if !slices.Contains(profiles, name) {
		return usageError{fmt.Sprintf("pprof: unknown profile %q; want one of %s", name, strings.Join(profiles, ", "))}
	}
	timed := name == "profile" || name == "trace"
	if seconds != 0 && !timed {
		return usageError{fmt.Sprintf("pprof: -seconds is for profile (CPU) and trace, not %s", name)}
	}
	if timed && seconds == 0 {
		seconds = 30
	}
	st, err := c.getStatus()
	if err != nil {
		return err
	}
	w, err := t.find(st)
	if err != nil {
		return err
	}
	path := "/debug/pprof/" + name
	if timed {
		path += "?seconds=" + strconv.Itoa(seconds)
		fmt.Fprintf(c.out, "pprof: recording worker pid %d for %ds (%s)\n", w.PID, seconds, name)
	}
	if out == "" {
		slot := "spare"
		if w.Slot >= 0 {
			slot = "slot" + strconv.Itoa(w.Slot)
		}
		ext := ".pb.gz"
		if name == "trace" {
			ext = ".trace"
		}
		out = fmt.Sprintf("%s-%s-pid%d-%s%s", st.Cluster, slot, w.PID, name, ext)
	}
	resp, err := fetch(w, path, time.Duration(seconds)*time.Second+10*time.Second)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("pprof: %w", err)
	}
	n, err := io.Copy(f, resp.Body)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(out)
		return fmt.Errorf("pprof: read the %s profile of worker pid %d: %w", name, w.PID, err)
	}
	how, what := "go tool pprof "+out, "the "+name+" profile"
	switch name {
	case "profile":
		what = "a CPU profile"
	case "trace":
		how, what = "go tool trace "+out, "an execution trace"
	}
	where := w.State
	if w.Slot >= 0 {
		where = "slot " + strconv.Itoa(w.Slot) + ", " + w.State
	}
	fmt.Fprintf(c.out, "pprof: wrote %s of worker pid %d (%s) to %s (%d bytes); read it with: %s\n",
		what, w.PID, where, out, n, how)
	return nil
}

// metrics: metrics <slot|pid:N>, the worker's own /metrics (its
// Worker.SetOperatorHandler), as it serves them.
func (c *cli) metrics(args []string) error {
	if len(args) != 1 {
		return usageError{"metrics: want <slot|pid:N>"}
	}
	t, err := parseTarget("metrics", args[0])
	if err != nil {
		return err
	}
	st, err := c.getStatus()
	if err != nil {
		return err
	}
	w, err := t.find(st)
	if err != nil {
		return err
	}
	resp, err := fetch(w, "/metrics", 10*time.Second)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(c.out, resp.Body)
	return err
}
