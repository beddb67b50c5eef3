//go:build linux

package netlab

// FRR (zebra and bgpd) in a lab namespace, for the tests of BGP: a real
// router daemon, started with its own directory for configuration,
// sockets and logs, so that nothing of the machine's own FRR (if any) is
// read or touched, and killed when the test ends.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// FRR is zebra and bgpd running in one namespace.
type FRR struct {
	Dir  string // configuration, sockets, logs
	ns   *NS
	cmd  []*exec.Cmd
	done []chan struct{} // closed when cmd[i] exits
}

const frrDir = "/usr/lib/frr"

// FRRAvailable returns the path of bgpd, or skips (fails, with
// IPCLUSTER_REQUIRE_TOOLS=1) the test naming the package to install.
func FRRAvailable(t testing.TB) string {
	t.Helper()
	Tool(t, "frr", "vtysh")
	return Tool(t, "frr", filepath.Join(frrDir, "bgpd"))
}

// StartFRR starts zebra and then bgpd in ns with bgpdConf (FRR's
// configuration language), and stops them when the test ends, logging
// their logs if it failed. zebra installs the routes bgpd chooses in the
// namespace's kernel, as plain multipath routes (no nexthop objects), so
// that the test reads them as the kernel forwards; with noKernel it
// installs none (bgpd -n), and the test programs the kernel from
// BestPaths itself.
func StartFRR(t testing.TB, ns *NS, bgpdConf string, noKernel bool) *FRR {
	t.Helper()
	FRRAvailable(t)
	dir, err := os.MkdirTemp("", "ipcluster-frr-")
	if err != nil {
		t.Fatal(err)
	}
	r := &FRR{Dir: dir, ns: ns}
	t.Cleanup(func() {
		r.stop()
		if t.Failed() {
			for _, f := range []string{"zebra.log", "bgpd.log"} {
				if b, err := os.ReadFile(filepath.Join(dir, f)); err == nil {
					t.Logf("%s (last 6000 bytes):\n%s", f, tailOf(b, 6000))
				}
			}
		}
		os.RemoveAll(dir)
	})
	zebraConf := "hostname lab-router\nlog file " + filepath.Join(dir, "zebra.log") + "\nno zebra nexthop kernel enable\n"
	for name, conf := range map[string]string{"zebra.conf": zebraConf, "bgpd.conf": "log file " + filepath.Join(dir, "bgpd.log") + "\n" + bgpdConf, "vtysh.conf": ""} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// The daemons drop to FRR's own user (its packages make root's vty
	// group membership a requirement otherwise): the directory is theirs.
	if u, err := user.Lookup("frr"); err == nil {
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		for _, p := range []string{dir, filepath.Join(dir, "zebra.conf"), filepath.Join(dir, "bgpd.conf"), filepath.Join(dir, "vtysh.conf")} {
			if err := os.Chown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
	} else {
		t.Fatalf("FRR's user: %v (the frr package creates it)", err)
	}
	zserv := filepath.Join(dir, "zserv.api")
	for _, d := range []struct {
		name string
		args []string
	}{
		{"zebra", []string{"-f", filepath.Join(dir, "zebra.conf"), "-i", filepath.Join(dir, "zebra.pid"), "-z", zserv, "--vty_socket", dir, "-u", "frr", "-g", "frr", "-P", "0"}},
		{"bgpd", append([]string{"-f", filepath.Join(dir, "bgpd.conf"), "-i", filepath.Join(dir, "bgpd.pid"), "-z", zserv, "--vty_socket", dir, "-u", "frr", "-g", "frr", "-P", "0"}, noKernelFlag(noKernel)...)},
	} {
		cmd := exec.Command(filepath.Join(frrDir, d.name), d.args...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		if err := ns.Start(cmd); err != nil {
			t.Fatalf("start %s: %v", d.name, err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		r.cmd, r.done = append(r.cmd, cmd), append(r.done, done)
		// Each daemon is up once vtysh reaches it.
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if _, err := r.vtysh(d.name, "show version"); err == nil {
				break
			}
			select {
			case <-done:
				t.Fatalf("%s exited at start: %s", d.name, out.String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not start within 20s: %s", d.name, out.String())
			}
		}
	}
	return r
}

func noKernelFlag(on bool) []string {
	if on {
		return []string{"--no_kernel"}
	}
	return nil
}

func (r *FRR) stop() {
	for i := len(r.cmd) - 1; i >= 0; i-- {
		_ = syscall.Kill(-r.cmd[i].Process.Pid, syscall.SIGKILL)
		<-r.done[i]
	}
}

func (r *FRR) vtysh(daemon, cmd string) (string, error) {
	args := []string{"--vty_socket", r.Dir, "--config_dir", r.Dir, "-c", cmd}
	if daemon != "" {
		args = append([]string{"-d", daemon}, args...)
	}
	out, err := exec.Command("vtysh", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("vtysh -c %q: %w: %s", cmd, err, out)
	}
	return string(out), nil
}

// Vtysh runs one vtysh command and returns its output.
func (r *FRR) Vtysh(cmd string) (string, error) { return r.vtysh("", cmd) }

// JSON runs a vtysh "show ... json" command and decodes its output.
func (r *FRR) JSON(cmd string, v any) error {
	out, err := r.Vtysh(cmd)
	if err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("vtysh -c %q: decode %q: %w", cmd, strings.TrimSpace(tailOf([]byte(out), 500)), err)
	}
	return nil
}

func tailOf(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// BestPaths returns the next hops of the paths bgpd uses for prefix: the
// best path and those multipath adds to it, as it would install them.
func (r *FRR) BestPaths(prefix string) ([]netip.Addr, error) {
	var route struct {
		Paths []struct {
			Valid     bool `json:"valid"`
			Multipath bool `json:"multipath"`
			Bestpath  *struct {
				Overall bool `json:"overall"`
			} `json:"bestpath"`
			Nexthops []struct {
				IP string `json:"ip"`
			} `json:"nexthops"`
		} `json:"paths"`
	}
	if err := r.JSON("show bgp ipv4 unicast "+prefix+" json", &route); err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, p := range route.Paths {
		if !p.Valid || !(p.Multipath || p.Bestpath != nil && p.Bestpath.Overall) || len(p.Nexthops) == 0 {
			continue
		}
		if a, err := netip.ParseAddr(p.Nexthops[0].IP); err == nil {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}
