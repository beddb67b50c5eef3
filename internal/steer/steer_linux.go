//go:build linux

package steer

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Errors New and Check wrap (test with errors.Is).
var (
	// ErrPermission: the kernel refused to create the array or load the
	// program; the process lacks CAP_BPF.
	ErrPermission = errors.New("steer: not permitted to load BPF programs (CAP_BPF missing)")
	// ErrKernel: the kernel has no SK_REUSEPORT programs or
	// REUSEPORT_SOCKARRAY maps (Linux 4.19).
	ErrKernel = errors.New("steer: kernel without SK_REUSEPORT programs (needs Linux 4.19)")
)

// permissionError is a refusal for want of CAP_BPF. It says so in its
// own words: cilium/ebpf reports EPERM as "MEMLOCK may be too low", which
// on kernels since 5.11 (BPF memory charged to the cgroup, not to
// RLIMIT_MEMLOCK) means a missing capability.
type permissionError struct {
	what string // what was refused
	err  error
}

func (e *permissionError) Error() string {
	return fmt.Sprintf("steer: %s: %v: the process lacks CAP_BPF (CAP_SYS_ADMIN before Linux 5.8): "+
		"grant it (AmbientCapabilities=CAP_BPF in a systemd unit, or setcap cap_bpf+ep on the binary), "+
		"or use a DNAT backend (before Linux 5.11 a low RLIMIT_MEMLOCK is refused the same way)", e.what, unix.EPERM)
}

func (e *permissionError) Unwrap() []error { return []error{ErrPermission, e.err} }

// eNOTSUPP is the kernel's internal ENOTSUPP (524), which the socket
// option and the array return for sockets that are not TCP or UDP; x/sys/unix
// has no name for it. An MPTCP socket refuses the option with EOPNOTSUPP.
const eNOTSUPP = syscall.Errno(524)

func notSupported(err error) bool { return errors.Is(err, eNOTSUPP) || errors.Is(err, unix.EOPNOTSUPP) }

// Selector is one SK_REUSEPORT program and the REUSEPORT_SOCKARRAY it
// selects from, for one reuseport group (one address, port, protocol and
// family, or one dual-stack [::] group).
//
// Every method but Close is safe for concurrent use: each is one system
// call, and the kernel serialises map updates. A Selector's fields never
// change after New.
type Selector struct {
	spec       Spec
	prog       *ebpf.Program
	slots      *ebpf.Map // MaxWorkers entries; shared with the Selectors Reprogram makes
	migrate    bool
	migrateErr error // why SELECT_OR_MIGRATE was refused, when !migrate
	insns      int
}

// New creates an array of MaxWorkers empty slots and loads a program for
// spec over it. The program is loaded as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
// where the kernel has it (5.14), else as plain SELECT: Migrates tells
// which.
//
// New raises RLIMIT_MEMLOCK where the kernel still charges BPF memory to
// it (before 5.11); elsewhere that is a no-op. Errors wrap ErrPermission
// or ErrKernel where one of those is the cause, and say what to do.
func New(spec Spec) (*Selector, error) {
	spec, err := spec.withDefaults()
	if err != nil {
		return nil, err
	}
	// Best effort: it fails without CAP_SYS_RESOURCE, and the load that
	// follows then reports what is missing.
	_ = rlimit.RemoveMemlock()
	slots, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       spec.Name,
		Type:       ebpf.ReusePortSockArray,
		KeySize:    4,
		ValueSize:  8, // a socket fd on update; its cookie on lookup
		MaxEntries: MaxWorkers,
	})
	if err != nil {
		return nil, classify("create the REUSEPORT_SOCKARRAY", err, func() error { return features.HaveMapType(ebpf.ReusePortSockArray) })
	}
	s, err := load(spec, slots, true)
	if err != nil {
		slots.Close()
		return nil, err
	}
	return s, nil
}

// Reprogram builds a Selector for another spec over the same array: the
// way to resize (or change the prefixes). Its Attach swaps the group's
// program in one step; the array, and every slot already set, is shared,
// so no socket has to leave the old array first (a socket can be in only
// one). To grow from 2 to 4 workers: next := s.Reprogram(4), next.Set the
// new slots 2 and 3 (the old program never selects them), next.Attach,
// s.Close. To shrink: next.Attach first, then Clear the slots above the
// new count. Both Selectors stay usable; each Close closes only its own
// descriptors.
func (s *Selector) Reprogram(spec Spec) (*Selector, error) {
	spec, err := spec.withDefaults()
	if err != nil {
		return nil, err
	}
	slots, err := s.slots.Clone()
	if err != nil {
		return nil, fmt.Errorf("steer: duplicate the array's descriptor: %w", err)
	}
	n, err := load(spec, slots, s.migrate)
	if err != nil {
		slots.Close()
		return nil, err
	}
	return n, nil
}

// ArrayFile is a new descriptor of the Selector's array, to hand to
// another process along with the group's sockets (os/exec ExtraFiles, or
// SCM_RIGHTS), which rebuilds a Selector over it with Open. The sockets
// stay in their slots whatever happens to this process: the group's
// program holds the array. A process that has neither the array nor a
// Selector over it cannot put those sockets in an array of its own
// (EBUSY) until it has detached the group's program (the group then
// hashes new connections over all its sockets) and the kernel has freed
// the old array, about 10 ms later here. So whoever may take the sockets
// over (a new master, the workers that keep the sockets for it) should
// keep the array too. The caller owns the file.
func (s *Selector) ArrayFile() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(s.slots.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("steer: duplicate the array's descriptor: %w", err)
	}
	return os.NewFile(uintptr(fd), "reuseport-sockarray"), nil
}

// Open builds a Selector for spec over an array that ArrayFile made,
// perhaps in another process: its slots keep the sockets they hold. The
// program is new; Attach it to the group to make it (rather than the
// program that came with the array) the group's. Open keeps its own
// descriptor: the caller may close array.
func Open(spec Spec, array *os.File) (*Selector, error) {
	spec, err := spec.withDefaults()
	if err != nil {
		return nil, err
	}
	// Not array.Fd(), which would switch the file to blocking mode.
	var fd int
	err = control(array, func(f int) (err error) {
		fd, err = unix.FcntlInt(uintptr(f), unix.F_DUPFD_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("steer: duplicate the array's descriptor: %w", err)
	}
	slots, err := ebpf.NewMapFromFD(fd)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("steer: open the array %s: %w", array.Name(), err)
	}
	if slots.Type() != ebpf.ReusePortSockArray || slots.KeySize() != 4 || slots.ValueSize() != 8 || slots.MaxEntries() != MaxWorkers {
		slots.Close()
		return nil, fmt.Errorf("steer: open the array %s: it is a %v with keys of %d bytes, values of %d and %d entries, not a REUSEPORT_SOCKARRAY made by New (4, 8 and %d)",
			array.Name(), slots.Type(), slots.KeySize(), slots.ValueSize(), slots.MaxEntries(), MaxWorkers)
	}
	s, err := load(spec, slots, true)
	if err != nil {
		slots.Close()
		return nil, err
	}
	return s, nil
}

// load loads the program for spec over slots: SELECT_OR_MIGRATE first if
// tryMigrate, then plain SELECT.
func load(spec Spec, slots *ebpf.Map, tryMigrate bool) (*Selector, error) {
	s := &Selector{spec: spec, slots: slots}
	var errMigrate error
	if tryMigrate {
		s.prog, errMigrate = loadProgram(spec, slots, true)
		if errMigrate == nil {
			s.migrate = true
		} else if errors.Is(errMigrate, unix.EPERM) {
			return nil, classify("load the SK_REUSEPORT program", errMigrate, nil)
		}
	}
	if s.prog == nil {
		var err error
		s.prog, err = loadProgram(spec, slots, false)
		if err != nil {
			if errMigrate != nil {
				err = fmt.Errorf("%w (and as SELECT_OR_MIGRATE: %w)", err, errMigrate)
			}
			return nil, classify("load the SK_REUSEPORT program", err, func() error { return features.HaveProgramType(ebpf.SkReuseport) })
		}
		if errMigrate != nil {
			s.migrateErr = fmt.Errorf("steer: the kernel refused a BPF_SK_REUSEPORT_SELECT_OR_MIGRATE program (Linux 5.14 has it), so a closing listener's queued connections are reset rather than moved: %w", errMigrate)
		} else {
			s.migrateErr = errors.New("steer: loaded as plain SELECT, like the Selector it was reprogrammed from")
		}
	}
	s.insns = int(instructions(spec, slots, s.migrate).Size() / asm.InstructionSize)
	return s, nil
}

func loadProgram(spec Spec, slots *ebpf.Map, migrate bool) (*ebpf.Program, error) {
	attach := ebpf.AttachSkReuseportSelect
	if migrate {
		attach = ebpf.AttachSkReuseportSelectOrMigrate
	}
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         spec.Name,
		Type:         ebpf.SkReuseport,
		AttachType:   attach,
		Instructions: instructions(spec, slots, migrate),
		License:      "Dual BSD/GPL",
	})
}

// classify wraps err from doing what with ErrPermission or ErrKernel when
// one of them is the cause; probe, if set, tells whether the kernel has
// the feature at all (it is only asked after a failure not due to
// permissions, as it needs them too).
func classify(what string, err error, probe func() error) error {
	if errors.Is(err, unix.EPERM) {
		return &permissionError{what: what, err: err}
	}
	if probe != nil && errors.Is(probe(), ebpf.ErrNotSupported) {
		return fmt.Errorf("%w: %s: %w: run on Linux 4.19 or later, or choose a DNAT backend", ErrKernel, what, err)
	}
	return fmt.Errorf("steer: %s: %w", what, err)
}

// Spec is the spec the program was built for, its defaults filled in.
func (s *Selector) Spec() Spec { return s.spec }

// Migrates reports whether the program was loaded as
// BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: a closing listener's queued
// connections (and requests still in their handshake) then move to the
// socket their slot points at, whatever net.ipv4.tcp_migrate_req says.
// Without it they are reset when it is 0, or hashed to any socket of the
// group when it is 1.
func (s *Selector) Migrates() bool { return s.migrate }

// MigrateErr is why the program is not SELECT_OR_MIGRATE (nil when it
// is): for the log line that says which.
func (s *Selector) MigrateErr() error { return s.migrateErr }

// Instructions is the length of the program in BPF instructions, as the
// kernel counts them (a 64-bit load takes two).
func (s *Selector) Instructions() int { return s.insns }

// IDs are the kernel's IDs of the program and the array, as bpftool
// lists them: to check that nothing is left after a stop (both are freed
// when the last descriptor and the last group holding the program are
// gone).
func (s *Selector) IDs() (program, array uint32, err error) {
	pi, err := s.prog.Info()
	if err != nil {
		return 0, 0, fmt.Errorf("steer: program info: %w", err)
	}
	mi, err := s.slots.Info()
	if err != nil {
		return 0, 0, fmt.Errorf("steer: array info: %w", err)
	}
	pid, _ := pi.ID()
	mid, _ := mi.ID()
	return uint32(pid), uint32(mid), nil
}

// control runs fn on c's file descriptor.
func control(c syscall.Conn, fn func(fd int) error) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

func (s *Selector) checkSlot(slot int) error {
	if slot < 0 || slot >= s.spec.Workers {
		return fmt.Errorf("steer: slot %d is outside 0..%d (Workers %d)", slot, s.spec.Workers-1, s.spec.Workers)
	}
	return nil
}

// Set points slot at c, a socket of the group (a *net.TCPListener, a
// *net.UDPConn, an *os.File): one map update, effective for the next
// connection. Setting the socket a slot already holds is a no-op. A
// socket can be in one slot of one array at a time: to move it to another
// slot, Clear its slot first.
func (s *Selector) Set(slot int, c syscall.Conn) error {
	if err := s.checkSlot(slot); err != nil {
		return err
	}
	err := control(c, func(fd int) error {
		return s.slots.Update(uint32(slot), uint64(fd), ebpf.UpdateAny)
	})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EBUSY):
		if have, ok, _ := s.Cookie(slot); ok {
			if own, cerr := SocketCookie(c); cerr == nil && own == have {
				return nil
			}
		}
		return fmt.Errorf("steer: set slot %d: %w: the socket is already in a slot, of this array or another (a socket can be in one REUSEPORT_SOCKARRAY entry at a time): Clear that slot first; to change the spec use Reprogram, and in another process Open over the array (ArrayFile), rather than a second New", slot, err)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("steer: set slot %d: %w: the socket is not a bound (UDP) or listening (TCP) SO_REUSEPORT socket: make it with ListenTCP or ListenUDP", slot, err)
	case notSupported(err):
		return fmt.Errorf("steer: set slot %d: %w: %s", slot, err, notTCPUDP(c))
	}
	return fmt.Errorf("steer: set slot %d: %w", slot, err)
}

// notTCPUDP explains the kernel's ENOTSUPP for socket c.
func notTCPUDP(c syscall.Conn) string {
	var proto int
	_ = control(c, func(fd int) (err error) {
		proto, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
		return err
	})
	if proto == unix.IPPROTO_MPTCP {
		return "the socket is MPTCP (protocol 262), which SK_REUSEPORT programs cannot steer: make it with ListenTCP, which turns MPTCP off"
	}
	return fmt.Sprintf("the socket's protocol is %d, not TCP or UDP over IPv4 or IPv6", proto)
}

// Clear empties slot: its new connections are dropped until the next Set.
// Clearing an empty slot is a no-op. A socket that closes leaves its slot
// by itself.
func (s *Selector) Clear(slot int) error {
	if err := s.checkSlot(slot); err != nil {
		return err
	}
	err := s.slots.Delete(uint32(slot))
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("steer: clear slot %d: %w", slot, err)
	}
	return nil
}

// Cookie is the socket cookie (SO_COOKIE, see SocketCookie) of the socket
// slot points at; ok is false for an empty slot.
func (s *Selector) Cookie(slot int) (cookie uint64, ok bool, err error) {
	if err := s.checkSlot(slot); err != nil {
		return 0, false, err
	}
	err = s.slots.Lookup(uint32(slot), &cookie)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("steer: look up slot %d: %w", slot, err)
	}
	return cookie, true, nil
}

// Attach sets the program of c's whole reuseport group
// (SO_ATTACH_REUSEPORT_EBPF on any one of its sockets), replacing the
// group's program, if any, in one step: no connection sees neither. The
// group keeps the program, and through it the array, until it is
// replaced, detached or the group's last socket closes; Close does not
// detach it.
func (s *Selector) Attach(c syscall.Conn) error {
	err := control(c, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, s.prog.FD())
	})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("steer: attach the program: %w: the socket was not bound with SO_REUSEPORT: make it with ListenTCP or ListenUDP", err)
	case notSupported(err):
		return fmt.Errorf("steer: attach the program: %w: %s", err, notTCPUDP(c))
	}
	return fmt.Errorf("steer: attach the program: %w", err)
}

// Stats are the program's run count and total run time since it was
// loaded (across every group it is attached to). The kernel counts only
// while BPF statistics are on (sysctl kernel.bpf_stats_enabled=1, or
// BPF_ENABLE_STATS); otherwise both are 0.
func (s *Selector) Stats() (runCount, runTimeNs uint64, err error) {
	st, err := s.prog.Stats()
	if err != nil {
		return 0, 0, fmt.Errorf("steer: program stats: %w", err)
	}
	return st.RunCount, uint64(st.Runtime.Nanoseconds()), nil
}

// Close closes the Selector's descriptors of the program and the array.
// A group the program is attached to keeps both (and the sockets stay in
// their slots) until its program is replaced or detached, or the group's
// last socket closes. Safe to call more than once.
func (s *Selector) Close() error {
	return errors.Join(s.prog.Close(), s.slots.Close())
}

// Detach removes the program of c's reuseport group
// (SO_DETACH_REUSEPORT_BPF, Linux 5.3): the kernel then hashes new
// connections over the group's sockets. A group without a program is not
// an error.
func Detach(c syscall.Conn) error {
	err := control(c, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
	})
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("steer: detach the group's program: %w", err)
	}
	return nil
}

// SocketCookie is c's socket cookie (SO_COOKIE): the kernel's identity of
// the socket, the same through every descriptor of it and in every
// process, and what Cookie returns for the slot it is in.
func SocketCookie(c syscall.Conn) (uint64, error) {
	var cookie uint64
	err := control(c, func(fd int) (err error) {
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("steer: read the socket cookie: %w", err)
	}
	return cookie, nil
}
