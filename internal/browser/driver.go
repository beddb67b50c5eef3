//go:build linux

package browser

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/chromedp/chromedp"
	"golang.org/x/sys/unix"
)

// init turns the process into a driver when Start re-executed it, before
// anything else of the program (TestMain, the tests) runs.
func init() {
	js, ok := os.LookupEnv(driverEnv)
	if !ok {
		return
	}
	os.Unsetenv(driverEnv) // not for Chromium
	os.Exit(runDriver(js, os.Stdin, os.Stdout))
}

// runDriver runs Chromium as opts say and serves requests from in, one
// JSON line each, with one JSON line each on out. It returns the process
// exit status once in reaches EOF or a "close" request, having stopped
// Chromium.
func runDriver(js string, in io.Reader, out *os.File) int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "browser driver: "+format+"\n", args...)
		return 2
	}
	var opts driverOptions
	if err := json.Unmarshal([]byte(js), &opts); err != nil {
		return fail("bad %s: %v", driverEnv, err)
	}
	// Refuse to run a browser anywhere but in the lab: its traffic must
	// never be in the machine's own namespace.
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil || st.Ino != opts.Netns {
		return fail("not inside the lab's client namespace (network namespace inode %d, want %d, %v); refusing to run", st.Ino, opts.Netns, err)
	}
	// Replies only on out: anything else that writes to stdout goes to
	// stderr instead.
	os.Stdout = os.Stderr
	os.Unsetenv("CHROMEDP_VISIBLEWINDOW")

	chromeOut := &tail{max: 8 << 10}
	aopts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(opts.Chromium),
		chromedp.NoSandbox, // not root, but no setuid sandbox or user namespaces to rely on either
		chromedp.DisableGPU,
		chromedp.Flag("no-proxy-server", true),
		chromedp.WindowSize(opts.Width, opts.Height),
		chromedp.UserDataDir(filepath.Join(opts.Dir, "profile")),
		chromedp.Env("HOME="+opts.Dir, "XDG_CONFIG_HOME="+opts.Dir, "XDG_CACHE_HOME="+opts.Dir, "TMPDIR="+opts.Dir),
		chromedp.CombinedOutput(io.MultiWriter(os.Stderr, chromeOut)),
		chromedp.ModifyCmdFunc(func(cmd *exec.Cmd) {
			cmd.SysProcAttr = &syscall.SysProcAttr{
				// Its own uid, which the lab's routing rule sends out
				// from the chosen address.
				Credential: &syscall.Credential{Uid: opts.UID, Gid: opts.UID, Groups: []uint32{}},
				// Its own group, so it and its helpers die together;
				// and with the driver (chromedp keeps the starting
				// thread locked for Chromium's lifetime).
				Setpgid:   true,
				Pdeathsig: syscall.SIGKILL,
			}
		}),
	)
	if opts.IgnoreCertErrors {
		aopts = append(aopts, chromedp.IgnoreCertErrors)
	}
	actx, acancel := chromedp.NewExecAllocator(context.Background(), aopts...)
	defer acancel()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()

	enc := json.NewEncoder(out)
	send := func(r reply) bool { return enc.Encode(r) == nil }
	explain := func(err error, ctx context.Context) string {
		msg := err.Error()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			msg = fmt.Sprintf("timed out after %v: %s", Timeout, msg)
		}
		var exit *exec.ExitError
		var exc *chromedp.ExceptionError
		if !errors.As(err, &exc) || errors.As(err, &exit) {
			if s := chromeOut.String(); s != "" {
				msg += "\nChromium's output ends with:\n" + s
			}
		}
		return msg
	}

	// The first Run starts Chromium; it must not have a timeout (that would
	// end the browser with it), so the bound is a timer instead.
	started := make(chan error, 1)
	go func() { started <- chromedp.Do(ctx) }()
	select {
	case err := <-started:
		if err != nil {
			send(reply{Err: explain(err, ctx)})
			return 1
		}
	case <-time.After(Timeout):
		send(reply{Err: fmt.Sprintf("%s: timed out after %v\nChromium's output ends with:\n%s", opts.Chromium, Timeout, chromeOut)})
		return 1
	}
	pid := 0
	if p := chromedp.FromContext(ctx).Browser.Process(); p != nil {
		pid = p.Pid
	}
	if !send(reply{PID: pid}) {
		return 1
	}

	sc := bufio.NewScanner(in)
	sc.Buffer(nil, 64<<20)
	for sc.Scan() {
		var req request
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			send(reply{Err: fmt.Sprintf("bad request %q: %v", sc.Bytes(), err)})
			continue
		}
		if req.Op == "close" {
			break
		}
		timeout := time.Duration(req.TimeoutMS) * time.Millisecond
		if timeout <= 0 {
			timeout = Timeout
		}
		cctx, ccancel := context.WithTimeout(ctx, timeout)
		var r reply
		var err error
		switch req.Op {
		case "navigate":
			err = chromedp.Do(cctx, chromedp.Navigate(req.Arg))
		case "eval":
			var v []byte
			v, err = chromedp.Run(cctx, chromedp.Evaluate[[]byte](req.Arg, chromedp.EvalAwaitPromise))
			r.Value = v
		case "screenshot":
			r.PNG, err = chromedp.Run(cctx, chromedp.CaptureScreenshot())
		default:
			err = fmt.Errorf("unknown operation %s", strconv.Quote(req.Op))
		}
		if err != nil {
			r = reply{Err: explain(err, cctx)}
		}
		ccancel()
		if !send(r) {
			break
		}
	}

	// Close the browser gracefully for a moment, then kill it (acancel).
	closed := make(chan error, 1)
	go func() { closed <- chromedp.Cancel(ctx) }()
	select {
	case <-closed:
	case <-time.After(closeTimeout / 2):
	}
	return 0
}
