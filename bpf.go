//go:build linux

package ipcluster

// The bpf rule backend: no NAT, no conntrack entry. Each public port has
// one SO_REUSEPORT group, made of the workers' sockets bound to the public
// address and port themselves (the master makes them all: sockets.go), and
// one SK_REUSEPORT program attached to the group that reads a new
// connection's (or datagram's) source address, takes the same slot bits
// as the nat rules, and picks the slot's socket from a REUSEPORT_SOCKARRAY
// (internal/steer). A slot re-point is one map update; established
// connections never reach the program, so they stay with their worker;
// a closing socket's queued connections migrate to its slot's new socket
// (SELECT_OR_MIGRATE, Linux 5.14).
//
//	client ──SYN──▶ reuseport group 198.18.0.1:8080 ──program: slot bits──▶ sockarray[slot] ──▶ that worker's socket
//
// What a DNAT backend calls a worker's port is, here, the port of the
// worker's own second socket, where a DNAT worker would listen
// (DialWorker's and HealthCheck's way to that one worker; for UDP, it
// names the worker's socket but nothing reads it). The slot targets are
// those ports; resolve finds the sockets.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/steer"
)

// bpfWriter is the bpf backend. Like every backend it is used from the
// master's loop only.
type bpfWriter struct {
	rt *routing
	// resolve finds the sockets a slot target names (the master's
	// sockets, by their own ports); set by newMaster.
	resolve func(slotTarget) *sockSet
	// routesPath is where apply records the routes, for a master started
	// after this one (routes): the kernel's array cannot be read back by
	// a process without its descriptor.
	routesPath string

	sels     map[Port]*steer.Selector // one per public port
	arrays   map[Port]*os.File        // a copy of each one's array, for the workers
	attached map[Port]bool            // sels[p] is the group's program
	placed   map[Port][]uint64        // the socket cookie each slot points at, as written
	recorded map[Port]uint32          // the arrays the last master recorded (routes)
	written  []slotTarget             // the targets of the last apply
	applied  bool                     // apply succeeded once
	stale    bool                     // invalidate: rebuild the programs for the new slot count
	ops      int
}

func newBPFWriter(rt *routing) *bpfWriter {
	return &bpfWriter{rt: rt, sels: map[Port]*steer.Selector{}, arrays: map[Port]*os.File{},
		attached: map[Port]bool{}, placed: map[Port][]uint64{}, recorded: map[Port]uint32{}}
}

func (w *bpfWriter) spec() steer.Spec {
	return steer.Spec{Workers: w.rt.workers, V4Prefix: w.rt.prefix[familyIPv4], V6Prefix: w.rt.prefix[familyIPv6],
		Name: "ipc_" + w.rt.name}
}

// apply points each slot of each public port's array at its worker's
// socket, and attaches the program to the group.
func (w *bpfWriter) apply(_ context.Context, targets, _ []slotTarget) error {
	for i, p := range w.rt.ports {
		if err := w.applyPort(p, i, targets); err != nil {
			return fmt.Errorf("bpf backend, public port %s: %w", p, err)
		}
	}
	w.written = slices.Clone(targets)
	w.stale, w.applied = false, true
	return nil
}

func (w *bpfWriter) applyPort(p Port, idx int, targets []slotTarget) error {
	if err := w.ensure(); err != nil {
		return err
	}
	sel := w.sels[p]
	if w.stale || sel.Spec().Workers != w.rt.workers {
		next, err := sel.Reprogram(w.spec())
		if err != nil {
			return err
		}
		// Grow: fill the new slots, then swap programs. Shrink: swap,
		// then clear (through the old program's Selector, whose slots
		// they are) the slots the new one no longer selects.
		old := sel
		defer func() {
			for slot := w.rt.workers; slot < old.Spec().Workers; slot++ {
				if w.placed[p][slot] != 0 && old.Clear(slot) == nil {
					w.placed[p][slot] = 0
					w.ops++
				}
			}
			old.Close()
		}()
		sel = next
		w.sels[p], w.attached[p] = next, false
	}
	placed := w.placed[p]
	var group *os.File
	for slot := range w.rt.workers {
		var s *sockSet
		if slot < len(targets) && targets[slot] != nil {
			s = w.resolve(targets[slot])
		}
		if s == nil {
			if placed[slot] != 0 {
				if err := sel.Clear(slot); err != nil {
					return fmt.Errorf("clear slot %d: %w", slot, err)
				}
				placed[slot] = 0
				w.ops++
			}
			continue
		}
		f := s.files[idx]
		group = f
		cookie, err := s.cookie(idx)
		if err != nil {
			return fmt.Errorf("slot %d: %w", slot, err)
		}
		if placed[slot] == cookie {
			continue
		}
		err = sel.Set(slot, f)
		if errors.Is(err, unix.EBUSY) && !w.attached[p] {
			// The socket is in another array: a master that died left
			// its program and array on the group, and no worker brought
			// the array back (offerArrays). Attaching this program
			// frees them, and the socket with them, shortly after; the
			// group's new connections are refused meanwhile.
			err = w.takeGroup(sel, f, slot)
			w.attached[p] = err == nil
		}
		if err != nil {
			return fmt.Errorf("point slot %d at its worker's socket: %w", slot, err)
		}
		placed[slot] = cookie
		w.ops++
	}
	if group != nil && !w.attached[p] {
		if err := sel.Attach(group); err != nil {
			return err
		}
		w.attached[p] = true
		w.ops++
	}
	return nil
}

// selector is public port p's Selector, whose program a new socket of
// the port's group is made with (openSockets).
func (w *bpfWriter) selector(p Port) (*steer.Selector, error) {
	if err := w.ensure(); err != nil {
		return nil, err
	}
	return w.sels[p], nil
}

// ensure makes each public port's Selector (and the copy of its array
// the workers keep) the first time one is needed.
func (w *bpfWriter) ensure() error {
	for _, p := range w.rt.ports {
		if w.sels[p] != nil {
			continue
		}
		sel, err := steer.New(w.spec())
		if err != nil {
			return fmt.Errorf("bpf backend, public port %s: %w", p, err)
		}
		if err := w.use(p, sel); err != nil {
			sel.Close()
			return err
		}
	}
	return nil
}

// use makes sel public port p's Selector, unattached.
func (w *bpfWriter) use(p Port, sel *steer.Selector) error {
	f, err := sel.ArrayFile()
	if err != nil {
		return err
	}
	if old := w.sels[p]; old != nil {
		old.Close()
	}
	if old := w.arrays[p]; old != nil {
		old.Close()
	}
	w.sels[p], w.arrays[p], w.attached[p] = sel, f, false
	w.placed[p] = make([]uint64, steer.MaxWorkers)
	return nil
}

// arrayFiles are the arrays' descriptors, in port order, for workers to
// keep and hand to a master started after a kill -9 of this one (see
// offerArrays).
func (w *bpfWriter) arrayFiles() ([]*os.File, error) {
	if err := w.ensure(); err != nil {
		return nil, err
	}
	out := make([]*os.File, len(w.rt.ports))
	for i, p := range w.rt.ports {
		out[i] = w.arrays[p]
	}
	return out, nil
}

// offerArrays takes the arrays an adopted worker kept, one per public
// port, if they are the ones the last master recorded (or handed over:
// trusted) and nothing has been written yet: the group's sockets are in
// them (a socket can be in only one array), so over them this master's
// programs take the groups over without a gap. It owns files.
func (w *bpfWriter) offerArrays(files []*os.File, trusted bool) {
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	if w.applied || len(files) != len(w.rt.ports) {
		return
	}
	for i, p := range w.rt.ports {
		want := w.recorded[p]
		if !trusted && (want == 0 || w.arrays[p] != nil && w.ownArray(p) == want) {
			continue
		}
		sel, err := steer.Open(w.spec(), files[i])
		if err != nil {
			continue
		}
		id := uint32(0)
		if _, id, err = sel.IDs(); err != nil || !trusted && id != want {
			sel.Close()
			continue
		}
		w.recorded[p] = id
		if err := w.use(p, sel); err != nil {
			sel.Close()
			continue
		}
		for slot := range w.rt.workers {
			if c, ok, err := sel.Cookie(slot); err == nil && ok {
				w.placed[p][slot] = c
			}
		}
	}
}

// ownArray is the id of port p's array.
func (w *bpfWriter) ownArray(p Port) uint32 {
	if sel := w.sels[p]; sel != nil {
		if _, id, err := sel.IDs(); err == nil {
			return id
		}
	}
	return 0
}

// takeGroup attaches sel to the group of f in place of a dead master's
// program, and sets slot to f once the kernel has released f from the old
// array (it does so once the old program and array are freed).
func (w *bpfWriter) takeGroup(sel *steer.Selector, f *os.File, slot int) error {
	if err := sel.Attach(f); err != nil {
		return err
	}
	w.ops++
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := sel.Set(slot, f)
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(time.Millisecond)
	}
}

// remove detaches the programs and closes the arrays: the kernel frees
// them with their last reference (the group's sockets close with the
// workers).
func (w *bpfWriter) remove(context.Context) error {
	var errs []error
	for i, p := range w.rt.ports {
		if w.resolve != nil {
			for _, t := range w.written {
				if s := w.resolve(t); t != nil && s != nil && len(s.files) > i {
					if err := steer.Detach(s.files[i]); err != nil {
						errs = append(errs, err)
					}
					break
				}
			}
		}
		if sel := w.sels[p]; sel != nil {
			errs = append(errs, sel.Close())
		}
		if f := w.arrays[p]; f != nil {
			f.Close()
		}
	}
	clear(w.sels)
	clear(w.arrays)
	clear(w.attached)
	clear(w.placed)
	w.written = nil
	if w.routesPath != "" {
		os.Remove(w.routesPath)
	}
	return errors.Join(errs...)
}

// check compares each slot's socket in the arrays with what was written:
// a socket that closed left its slot by itself.
func (w *bpfWriter) check(context.Context) error {
	for _, p := range w.rt.ports {
		sel := w.sels[p]
		if sel == nil {
			continue
		}
		for slot, want := range w.placed[p][:w.rt.workers] {
			got, ok, err := sel.Cookie(slot)
			if err != nil {
				return fmt.Errorf("bpf backend: read slot %d of public port %s: %w", slot, p, err)
			}
			if !ok {
				got = 0
			}
			if got != want {
				w.placed[p][slot] = ^uint64(0) // rewrite it
				return fmt.Errorf("%w: slot %d of public port %s points at socket %d, want %d", ErrRulesLost, slot, p, got, want)
			}
		}
	}
	return nil
}

// routes reads what the last master recorded (record): the array itself
// is unreadable to a process that does not hold its descriptor.
func (w *bpfWriter) routes(context.Context) ([]slotTarget, error) {
	out := make([]slotTarget, w.rt.workers)
	if w.routesPath == "" {
		return out, nil
	}
	b, err := os.ReadFile(w.routesPath)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return out, fmt.Errorf("read the routes the last master recorded: %w", err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		slotStr, rest, ok := strings.Cut(line, " ")
		if slotStr == "arrays" {
			for _, f := range strings.Fields(rest) {
				pub, id, _ := strings.Cut(f, "=")
				n, err := strconv.ParseUint(id, 10, 32)
				for _, p := range w.rt.ports {
					if p.String() == pub && err == nil {
						w.recorded[p] = uint32(n)
					}
				}
			}
			continue
		}
		slot, err := strconv.Atoi(slotStr)
		if !ok || err != nil || slot < 0 || slot >= len(out) {
			continue
		}
		t := slotTarget{}
		for _, f := range strings.Fields(rest) {
			pub, port, ok := strings.Cut(f, "=")
			n, err := strconv.ParseUint(port, 10, 16)
			if !ok || err != nil {
				continue
			}
			for _, p := range w.rt.ports {
				if p.String() == pub {
					t[p] = uint16(n)
				}
			}
		}
		if len(t) == len(w.rt.ports) {
			out[slot] = t
		}
	}
	return out, nil
}

// record writes the routes for routes, atomically: after each write
// (ruleSync.written), outside the write's measured time. A master that
// dies between the two leaves the routes of the write before; the next
// one then adopts that write's worker as active, and points the slot back
// at it.
func (w *bpfWriter) record(targets []slotTarget) {
	if w.routesPath == "" {
		return
	}
	var b strings.Builder
	b.WriteString("arrays")
	for _, p := range w.rt.ports {
		b.WriteString(" " + p.String() + "=" + strconv.Itoa(int(w.ownArray(p))))
	}
	b.WriteString("\n")
	for slot, t := range targets {
		if t == nil {
			continue
		}
		b.WriteString(strconv.Itoa(slot))
		for _, p := range w.rt.ports {
			b.WriteString(" " + p.String() + "=" + strconv.Itoa(int(t[p])))
		}
		b.WriteString("\n")
	}
	tmp := w.routesPath + ".tmp"
	if os.WriteFile(tmp, []byte(b.String()), 0o600) == nil {
		_ = os.Rename(tmp, w.routesPath)
	}
}

func (w *bpfWriter) invalidate() { w.stale = true }

func (w *bpfWriter) rulesText() map[string]string {
	var b strings.Builder
	for _, p := range w.rt.ports {
		sel := w.sels[p]
		if sel == nil {
			continue
		}
		mode := "select"
		if sel.Migrates() {
			mode = "select-or-migrate"
		}
		fmt.Fprintf(&b, "%s: sk_reuseport program (%s, %d instructions), %d slots\n", p, mode, sel.Instructions(), w.rt.workers)
		for slot := range w.rt.workers {
			port := uint16(0)
			if slot < len(w.written) && w.written[slot] != nil {
				port = w.written[slot][p]
			}
			fmt.Fprintf(&b, "  slot %d → socket %d (worker port %d)\n", slot, w.placed[p][slot], port)
		}
	}
	return map[string]string{"bpf": strings.TrimSuffix(b.String(), "\n")}
}

func (w *bpfWriter) changes() int { return w.ops }

// bpfCheck is steer.Check, once per process: the auto backend's probe.
var bpfCheck = sync.OnceValue(steer.Check)
