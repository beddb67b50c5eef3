//go:build linux

package ipcluster

// Deploys and master takeover.
//
// Exactly one master owns a cluster: the one holding RunDir/<Name>/lock. A
// master that starts while another holds it takes the cluster over: it
// connects to the control socket as role "master" and asks; the running
// master sends back, in one sendmsg, its listening control socket and its
// lock file (SCM_RIGHTS), closes its worker connections and returns from
// Run, leaving rules and workers alone. Nothing is ever without an owner:
// the lock's open file description passes from one process to the other,
// and connections to the socket queue in its backlog until the new master
// accepts. SIGHUP is the same thing started from inside: the master starts
// the binary now on disk, and that new master takes over.
//
// A starting master (after a takeover, or after its predecessor was
// killed) reads the routes its predecessor left in the kernel and adopts
// the workers that reconnect: one whose slot and ports match its slot's
// route, and that was not retired, stays active in it; the others drain as
// retired. Once every routed slot is adopted (or ConnectTimeout passes) it
// starts workers for the slots left empty, and if adopted workers run
// another build (Config.Version) it rolls them:
//
//	canary: one slot gets a new worker; the old one stands by
//	        (still listening, no longer routed) for CanaryPeriod
//	rolling: every other slot likewise, DeployPace apart
//	commit: every slot runs the new build: the old workers are retired
//	rollback (a new worker crash-loops, never becomes ready, fails the
//	        health check, or the canary crashes, hangs or trips a policy):
//	        every slot points back at its standby old worker, the new ones
//	        are retired, and further workers are spawned from the old
//	        build, whose executable the master holds open.
//
// SIGUSR2 (or a control client's restart) rolls every worker the same way
// with the master's own build.

import (
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// deployMaxFailures is how many failed starts of new workers (crash before
// ready, no ready in ConnectTimeout, failed readiness check) roll a deploy
// back.
const deployMaxFailures = 3

// successorTimeout bounds how long a master waits for the master it
// started on SIGHUP to take over.
const successorTimeout = 30 * time.Second

// envDeployReport names, in a master started for a deploy, the file where
// Run writes its error if it fails: the master that started it reads the
// file when it exits before taking over, and reports that error (say
// "Config.Workers: 3 is not a power of two") rather than an exit status.
// A file, not a pipe: the successor outlives the master that reads it.
const envDeployReport = "IPCLUSTER_DEPLOY_REPORT"

// maxDeployReport bounds what is read of a successor's report.
const maxDeployReport = 4 << 10

// deployReport is the file of envDeployReport, until this master has
// taken the cluster over (takeOver clears it): after that its predecessor
// is gone, and an error of this master's is its own to report.
var deployReport atomic.Pointer[string]

// deployReporter returns, in a master started for a deploy, a function
// that writes Run's error to the file its predecessor reads (see
// envDeployReport) if it has not taken the cluster over; elsewhere one
// that does nothing. The variable is removed from the environment, so
// nothing this process starts inherits it.
func deployReporter() func(error) {
	path := os.Getenv(envDeployReport)
	if path == "" {
		return func(error) {}
	}
	os.Unsetenv(envDeployReport)
	deployReport.Store(&path)
	return func(err error) {
		if p := deployReport.Swap(nil); p != nil && err != nil {
			_ = os.WriteFile(*p, []byte(err.Error()+"\n"), 0o600)
		}
	}
}

// readDeployReport reads and removes a successor's report: its error, or
// "" if it left none.
func readDeployReport(path string) string {
	defer os.Remove(path)
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, maxDeployReport))
	return strings.TrimSpace(string(b))
}

// codeGen is code workers can be spawned from: a build and its executable.
type codeGen struct {
	build string
	exe   *os.File // nil: this master's own executable
}

// path is what a child execs to run this code. Both are resolved by the
// child at exec time: /proc/self/exe is the master's own binary even after
// the file on disk was replaced, and /proc/self/fd/N a file the master
// holds open (the child inherits it until exec).
func (g *codeGen) path() string {
	if g.exe == nil {
		return "/proc/self/exe"
	}
	return "/proc/self/fd/" + strconv.Itoa(int(g.exe.Fd()))
}

// deployState is a deploy in progress.
type deployState struct {
	from, to    *codeGen
	gen         int // the generation of the new workers
	reason      string
	started     time.Time
	slots       []int         // every slot the deploy rolls, canary first
	next        int           // index in slots of the next slot to start
	canaryUntil time.Time     // zero until the canary serves
	nextStart   time.Time     // DeployPace: when the next slot may start
	standby     map[int]*proc // slot → its old worker, until commit or rollback
	failures    int
}

// selfBuild names this executable's code: Config.Version, or a hash of the
// Go build ID, which changes with any change to the code or its build.
func selfBuild(cfg *Config) string {
	if cfg.Version != "" {
		return cfg.Version
	}
	id, err := goBuildID("/proc/self/exe")
	if err != nil {
		return "unknown"
	}
	sum := sha256.Sum256([]byte(id))
	return "go-" + hex.EncodeToString(sum[:6])
}

// goBuildID reads the Go build ID note of an executable.
func goBuildID(path string) (string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return "", fmt.Errorf("read build ID of %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".note.go.buildid")
	if sec == nil {
		return "", fmt.Errorf("read build ID of %s: no .note.go.buildid section", path)
	}
	b, err := sec.Data()
	if err != nil || len(b) < 16 {
		return "", fmt.Errorf("read build ID of %s: bad note (%v)", path, err)
	}
	// An ELF note: name size, description size, type, the name ("Go\0\0")
	// padded to 4 bytes, then the description: the build ID.
	namesz, descsz := binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:])
	off := 12 + (namesz+3)&^3
	if uint64(off)+uint64(descsz) > uint64(len(b)) {
		return "", fmt.Errorf("read build ID of %s: truncated note", path)
	}
	return string(b[off : off+descsz]), nil
}

// ---- takeover: the running master's side ----

// handOver gives the cluster to the new master on pr: the control socket
// and the lock travel with the answer, then this master lets go of its
// workers (they reconnect, to the new master) and its loop returns.
func (m *master) handOver(pr *peer, build string) {
	if m.phase == phaseStopping || m.phase == phaseHandedOver {
		pr.refuse("master is stopping")
		return
	}
	lnFile, err := m.ln.File() // a duplicate: the socket lives on in the new master
	if err != nil {
		m.log.Error("takeover: cannot share the control socket; refusing", "err", err)
		pr.refuse("cannot share the control socket: " + err.Error())
		return
	}
	defer lnFile.Close()
	ho := &proto.Handover{MasterPID: os.Getpid(), Generation: m.gen, History: m.hist.handover(m.cfg.MonitorInterval, proto.MaxFrame/2), Drained: m.drained}
	fds := []int{rawFD(lnFile), rawFD(m.lock)}
	for _, slot := range slices.Sorted(maps.Keys(m.held)) {
		s := m.held[slot]
		if len(fds)+len(s.files) > proto.MaxFDs {
			m.log.Warn("takeover: too many held sockets for one handover; the new master opens new ones for the rest", "slot", slot)
			break
		}
		ho.Held = append(ho.Held, proto.HeldSockets{Slot: slot, Ports: protoPorts(s.ports, m.rules.rt.ports)})
		fds = append(fds, s.fds()...)
	}
	if m.steer != nil {
		if arrays, aerr := m.steer.arrayFiles(); aerr == nil && len(fds)+len(arrays) <= proto.MaxFDs {
			fds = append(fds, rawFDs(arrays)...)
			ho.Arrays = len(arrays)
		}
	}
	pr.mu.Lock()
	_ = pr.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	err = proto.WriteFDs(pr.conn, proto.TypeHandover, ho, fds)
	pr.mu.Unlock()
	if err != nil {
		m.log.Error("takeover: sending the control socket and lock failed; keeping the cluster", "peer_pid", pr.pid, "err", err)
		return
	}
	m.phase = phaseHandedOver
	m.log.Info("handed the cluster over to a new master", "pid", pr.pid, "build", build, "workers", len(m.procs))
	m.notifyHandedOver(pr.pid)
	m.emit.send(EventDeploy{Outcome: DeployHandedOver, From: m.build, To: build,
		Reason: "new master pid " + strconv.Itoa(pr.pid)})
}

// letGo closes everything of this master's after a handover and touches
// nothing the new master now owns: rules, workers, run directory.
func (m *master) letGo() {
	m.ln.SetUnlinkOnClose(false)
	m.ln.Close()
	for pr := range m.peers {
		pr.close() // workers reconnect, to the new master
	}
	for _, p := range m.procs {
		if p.timer != nil {
			p.timer.Stop()
		}
		p.process.close()
		p.socks.close() // the worker hands its own to the new master
	}
	m.closeSockets() // the held ones went with the handover
	if m.lock != nil {
		m.lock.Close() // the new master holds the same open lock
	}
	if m.target.exe != nil {
		m.target.exe.Close()
	}
	if m.bgp != nil {
		m.bgp.Abandon() // the routers keep the routes for the new master
	}
}

// ---- takeover: the new master's side ----

// takeOver asks the master holding the cluster's lock to hand it over, and
// takes the control socket and lock it sends.
func (m *master) takeOver(held error) error {
	fail := func(err error) error {
		return fmt.Errorf("%w; taking the cluster over from it failed: %w", held, err)
	}
	conn, err := net.DialTimeout("unix", m.sock, m.cfg.ConnectTimeout)
	if err != nil {
		return fail(err)
	}
	defer conn.Close()
	uc := conn.(*net.UnixConn)
	_ = uc.SetDeadline(time.Now().Add(2 * m.cfg.ConnectTimeout))
	hello := &proto.Hello{Version: proto.Version, Role: proto.RoleMaster, Cluster: m.cfg.Name, PID: os.Getpid(), Build: m.build}
	if err := proto.Write(uc, proto.TypeHello, hello); err != nil {
		return fail(err)
	}
	if err := proto.Write(uc, proto.TypeTakeover, &proto.Takeover{Build: m.build}); err != nil {
		return fail(err)
	}
	// The answer is read with recvmsg, never through a buffered reader:
	// the descriptors ride on its first byte.
	msg, err := proto.NewUnixReader(uc).Read()
	if err != nil {
		return fail(fmt.Errorf("read the answer: %w", err))
	}
	fds := msg.FDs
	switch b := msg.Body.(type) {
	case *proto.Refuse:
		proto.CloseFDs(fds)
		return fail(errors.New(b.Reason))
	case *proto.Handover:
		held := 0
		for _, h := range b.Held {
			held += len(h.Ports)
		}
		if want := 2 + held + b.Arrays; len(fds) != want || b.Arrays < 0 {
			proto.CloseFDs(fds)
			return fail(fmt.Errorf("handover came with %d descriptors, want %d", len(fds), want))
		}
		m.takeHeld(b.Held, fds[2:2+held])
		m.hist.adopt(b.History)
		m.drained = b.Drained
		arrays := make([]*os.File, b.Arrays)
		for i, fd := range fds[2+held:] {
			arrays[i] = os.NewFile(uintptr(fd), "reuseport-sockarray")
		}
		if m.steer != nil {
			m.steer.offerArrays(arrays, true)
		} else {
			for _, f := range arrays {
				f.Close()
			}
		}
		lnFile := os.NewFile(uintptr(fds[0]), m.sock)
		ln, err := net.FileListener(lnFile)
		lnFile.Close()
		if err != nil {
			os.NewFile(uintptr(fds[1]), "lock").Close()
			return fail(err)
		}
		m.ln = ln.(*net.UnixListener)
		m.ln.SetUnlinkOnClose(false)
		m.lock = os.NewFile(uintptr(fds[1]), m.lockPath())
		if err := m.lock.Truncate(0); err == nil {
			_, _ = m.lock.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		}
		m.tookOver = true
		deployReport.Store(nil) // the master that started us, if one did, is done
		m.log.Info("took the cluster over", "from_pid", b.MasterPID, "from_generation", b.Generation)
		return nil
	}
	proto.CloseFDs(fds)
	return fail(fmt.Errorf("answered takeover with %q", msg.Type))
}

// ---- SIGHUP: start the successor ----

// startSuccessor starts the binary now on disk as a new master, which
// takes the cluster over. Until it does this master carries on; if it
// exits first, or takes too long, the deploy has failed.
func (m *master) startSuccessor() {
	if m.successor != nil || m.phase == phaseStopping {
		m.log.Warn("SIGHUP ignored: a deploy is already under way or the master is stopping")
		return
	}
	cmd := exec.Command(m.exe, m.args...)
	cmd.Env = append(slices.Clip(m.env), m.sd.successorEnv()...) // it talks to systemd in our stead
	// If it fails, it leaves its error there (deployReporter).
	_ = os.Remove(m.deployReportPath())
	cmd.Env = append(cmd.Env, envDeployReport+"="+m.deployReportPath())
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// Its own session: it outlives this master, which exits once it has
	// handed over.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		m.deployFailed(fmt.Sprintf("start %s: %v", m.exe, err))
		return
	}
	m.successor = cmd
	m.log.Info("SIGHUP: started a new master to take over", "pid", cmd.Process.Pid, "exe", m.exe)
	m.notifyReloading("SIGHUP: new master pid " + strconv.Itoa(cmd.Process.Pid))
	timer := time.AfterFunc(successorTimeout, func() { m.send(evSuccessorTimeout{cmd}) })
	go func() {
		status := waitStatus(cmd)
		timer.Stop()
		m.send(evSuccessorExit{cmd: cmd, status: status})
	}()
}

// Events about the successor.
type (
	evSuccessorExit struct {
		cmd    *exec.Cmd
		status string
	}
	evSuccessorTimeout struct{ cmd *exec.Cmd }
	evAdoptDeadline    struct{}
)

func (m *master) onSuccessorExit(ev evSuccessorExit) {
	if m.successor != ev.cmd {
		return
	}
	m.successor = nil
	if m.phase == phaseHandedOver {
		return
	}
	if report := readDeployReport(m.deployReportPath()); report != "" {
		m.deployFailed(fmt.Sprintf("new master pid %d: %s (%s)", ev.cmd.Process.Pid, report, ev.status))
		return
	}
	m.deployFailed(fmt.Sprintf("new master pid %d exited before taking over: %s (it reported no error: see its log)", ev.cmd.Process.Pid, ev.status))
}

func (m *master) onSuccessorTimeout(ev evSuccessorTimeout) {
	if m.successor == ev.cmd && m.phase != phaseHandedOver {
		m.log.Warn("new master did not take over in time; killing it", "pid", ev.cmd.Process.Pid, "timeout", successorTimeout)
		_ = ev.cmd.Process.Kill() // its exit reports the failure
	}
}

func (m *master) deployFailed(reason string) {
	m.log.Error("deploy failed; this master carries on", "reason", reason)
	m.setDeploy(DeployFailed, "failed: "+reason)
	m.emit.send(EventDeploy{Outcome: DeployFailed, From: m.build, Reason: reason})
	m.notifyReady()
}

// ---- adoption ----

// startAdoption reads the routes a previous master left. If there are
// any, the workers they point at are waited for (they reconnect on their
// own) before anything else is started for their slots.
//
// A slot whose route points at sockets that no longer exist lost its
// worker while no master ran (the worker held the last copy): nobody is
// waited for there, and its new worker starts at once. Nor is anybody for
// a slot whose held sockets came with a handover: its worker died under
// the previous master, and the next one inherits them now.
func (m *master) startAdoption(ctx context.Context) {
	routes, err := m.rules.routes(ctx)
	if err != nil {
		m.log.Warn("reading the routes a previous master left; starting fresh workers", "err", err)
		return
	}
	bound, err := boundPorts()
	if err != nil {
		m.log.Warn("cannot tell which routed sockets still exist; waiting for every routed slot's worker", "err", err)
	}
	var awaited []int
	for slot, t := range routes {
		switch {
		case t == nil:
		case m.held[slot] != nil:
			routes[slot] = nil
		case bound != nil && !bound.hasAll(t):
			m.log.Info("a previous master's route points at sockets that are gone: its worker died while no master ran; replacing it now",
				"slot", slot, "ports", portsString(t, m.rules.rt.ports))
			routes[slot] = nil
		default:
			awaited = append(awaited, slot)
		}
	}
	if len(awaited) > 0 {
		m.adoptRoutes = routes
		m.log.Info("found a previous master's routes; waiting for its workers", "slots", awaited, "timeout", m.cfg.ConnectTimeout)
		time.AfterFunc(m.cfg.ConnectTimeout, func() { m.send(evAdoptDeadline{}) })
	}
}

// adoptsActive reports whether an unknown worker saying hello is the one
// its slot's route points at, to be kept serving it.
func (m *master) adoptsActive(h *proto.Hello, ports slotTarget) bool {
	if !m.adopting() || h.Retired || h.Slot < 0 || m.slots[h.Slot] != nil {
		return false
	}
	want := m.adoptRoutes[h.Slot]
	if len(want) == 0 || len(want) != len(ports) {
		return false
	}
	for k, v := range want {
		if ports[k] != v {
			return false
		}
	}
	return true
}

// adopted records a worker adopted as active, and ends the adoption once
// every routed slot has its worker back.
func (m *master) adopted(p *proc) {
	p.state, p.activeSince = stateActive, time.Now()
	m.slots[p.slot] = p
	m.rules.markDirty()
	m.log.Info("adopted a previous master's worker in its slot", append(p.logAttrs(), "build", p.build)...)
	for slot, t := range m.adoptRoutes {
		if t != nil && m.slots[slot] == nil {
			return
		}
	}
	m.endAdoption()
}

// endAdoption starts workers for the slots no adopted worker serves, and
// rolls adopted workers of another build.
func (m *master) endAdoption() {
	if !m.adopting() {
		return
	}
	m.adoptRoutes = nil
	var roll []int
	var from *codeGen
	for slot, p := range m.slots {
		switch {
		case p == nil:
			if m.pending[slot] == nil {
				m.spawn(slot)
			}
		case p.build != m.target.build:
			roll = append(roll, slot)
			if from == nil {
				from = m.openGen(p)
			}
		}
	}
	m.fillSpares()
	if len(roll) > 0 {
		m.startDeploy(from, roll, fmt.Sprintf("adopted workers run build %s, this master %s", from.build, m.target.build))
	}
}

// openGen holds p's executable open, so that its build can be spawned
// again (after a rollback) even once the file on disk is replaced.
func (m *master) openGen(p *proc) *codeGen {
	g := &codeGen{build: p.build}
	f, err := os.Open("/proc/" + strconv.Itoa(p.pid) + "/exe")
	if err != nil {
		m.log.Warn("cannot hold the previous build's executable; a rollback would start workers of this build", append(p.logAttrs(), "err", err)...)
		return g
	}
	g.exe = f
	return g
}

// ---- rolling deploy ----

// startDeploy rolls slots (canary first) from the build from to this
// master's target.
func (m *master) startDeploy(from *codeGen, slots []int, reason string) {
	if m.dep != nil || m.resizing != nil || m.phase == phaseStopping {
		m.log.Warn("deploy not started: another deploy or a resize is under way, or the master is stopping", "reason", reason)
		return
	}
	m.gen++
	writeGeneration(m.generationPath(), m.gen)
	m.dep = &deployState{from: from, to: m.target, gen: m.gen, reason: reason, started: time.Now(), slots: slots,
		standby: map[int]*proc{}}
	m.setDeploy(DeployStarted, "rolling "+strconv.Itoa(len(slots))+" slots: "+reason)
	m.log.Info("deploy started", "from", from.build, "to", m.target.build, "slots", len(slots), "reason", reason,
		"canary", slots[0], "canary_period", m.cfg.CanaryPeriod)
	m.emit.send(EventDeploy{Outcome: DeployStarted, From: from.build, To: m.target.build, Reason: reason, Slots: len(slots)})
	m.notifyReloading(reason)
	m.dismissSpares()
	m.startNextSlot()
}

// startNextSlot starts the new worker of the deploy's next slot.
func (m *master) startNextSlot() {
	d := m.dep
	slot := d.slots[d.next]
	d.next++
	d.nextStart = time.Now().Add(m.cfg.DeployPace)
	if q := m.pending[slot]; q != nil && q.gen != d.gen {
		m.pending[slot] = nil
		m.kill(q)
	}
	if m.pending[slot] == nil {
		m.spawn(slot)
	}
}

// progressDeploy moves a deploy on: the canary's watch, the pace, the
// commit. Called after every burst of events and every sample.
func (m *master) progressDeploy(now time.Time) {
	d := m.dep
	if d == nil || m.phase == phaseStopping {
		return
	}
	canary := d.slots[0]
	if d.canaryUntil.IsZero() {
		if p := m.slots[canary]; p != nil && p.gen == d.gen {
			d.canaryUntil = now.Add(max(m.cfg.CanaryPeriod, 0))
			m.log.Info("canary serving its slot", append(p.logAttrs(), "watch", m.cfg.CanaryPeriod)...)
		}
		return
	}
	if now.Before(d.canaryUntil) {
		return
	}
	for d.next < len(d.slots) && !now.Before(d.nextStart) {
		m.startNextSlot()
	}
	for _, slot := range d.slots {
		if p := m.slots[slot]; p == nil || p.gen != d.gen {
			return
		}
	}
	m.commitDeploy(now)
}

// commitDeploy retires the old workers: every slot runs the new build.
func (m *master) commitDeploy(now time.Time) {
	d := m.dep
	m.dep = nil
	for _, old := range d.standby {
		if m.procs[old.pid] == old && old.state == stateStandby {
			old.state = stateRetired
			old.retireCause, old.retireAt = CauseDeploy, d.started
			old.retireReason = "deploy of " + d.to.build + " committed"
			m.retired(old, now)
		}
	}
	if d.from.exe != nil && d.from != m.target {
		d.from.exe.Close()
	}
	elapsed := now.Sub(d.started)
	m.setDeploy(DeployCommitted, fmt.Sprintf("committed %s in %s (%d slots)", d.to.build, elapsed.Round(time.Millisecond), len(d.slots)))
	m.log.Info("deploy committed", "build", d.to.build, "slots", len(d.slots), "elapsed", elapsed)
	m.emit.send(EventDeploy{Outcome: DeployCommitted, From: d.from.build, To: d.to.build, Reason: d.reason, Slots: len(d.slots), Elapsed: elapsed})
	m.notifyReady()
	m.fillSpares()
}

// deployTrouble is called when a worker of the deploy's new build fails.
// A failed start counts; the canary or a moved slot's worker failing rolls
// back at once.
func (m *master) deployTrouble(p *proc, serving bool, what string) bool {
	d := m.dep
	if d == nil || p.gen != d.gen {
		return false
	}
	if !serving {
		d.failures++
		m.log.Warn("new worker failed to start", append(p.logAttrs(), "what", what, "failures", d.failures, "limit", deployMaxFailures)...)
		if d.failures < deployMaxFailures {
			return false
		}
		what = fmt.Sprintf("%d new workers failed to start, the last: %s", d.failures, what)
	}
	m.rollback(what)
	return true
}

// rollback points every slot of the deploy back at its old worker and
// goes back to spawning the old build.
func (m *master) rollback(why string) {
	d := m.dep
	m.dep = nil
	m.target = d.from
	now := time.Now()
	for slot, q := range m.pending {
		if q != nil && q.gen == d.gen {
			m.pending[slot] = nil
			m.kill(q)
		}
	}
	for _, slot := range d.slots {
		old := d.standby[slot]
		if old != nil && m.procs[old.pid] == old && old.state == stateStandby {
			// activate retires the new worker once the rules point back.
			if cur := m.slots[slot]; cur != nil {
				cur.retireCause, cur.retireReason, cur.retireAt = CauseReplaced, "deploy rolled back", now
			}
			m.activate(old, slot)
			continue
		}
		if cur := m.slots[slot]; cur != nil && cur.gen == d.gen {
			m.retire(cur, CauseReplaced, "deploy rolled back")
		}
	}
	m.dismissSpares()
	elapsed := now.Sub(d.started)
	m.setDeploy(DeployRolledBack, fmt.Sprintf("rolled back to %s after %s: %s", d.from.build, elapsed.Round(time.Millisecond), why))
	m.log.Error("deploy rolled back", "from", d.from.build, "to", d.to.build, "reason", why, "elapsed", elapsed)
	m.emit.send(EventDeploy{Outcome: DeployRolledBack, From: d.from.build, To: d.to.build, Reason: why, Slots: len(d.slots), Elapsed: elapsed})
	m.notifyReady()
	m.fillSpares()
}

// dismissSpares lets go of spares not of the target build.
func (m *master) dismissSpares() {
	for _, sp := range append([]*proc(nil), m.spares...) {
		if sp.build != m.target.build {
			m.dismiss(sp, "spare of another build", false)
		}
	}
}

// restartAll rolls every active worker with this master's build (SIGUSR2).
func (m *master) restartAll(why string) {
	if m.adopting() || m.phase == phaseStarting {
		m.log.Warn("restart ignored: the cluster is not ready yet", "reason", why)
		return
	}
	var slots []int
	for slot, p := range m.slots {
		if p != nil {
			slots = append(slots, slot)
		}
	}
	if len(slots) > 0 {
		m.startDeploy(m.target, slots, why)
	}
}

// setDeploy records a deploy's phase for the status.
func (m *master) setDeploy(phase DeployOutcome, text string) {
	m.deployPhase, m.lastDeploy = phase, text
}

// adopting reports whether a previous master's workers are waited for.
func (m *master) adopting() bool { return m.adoptRoutes != nil }
