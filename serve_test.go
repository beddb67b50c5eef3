//go:build linux

package ipcluster_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
)

// httpWorker serves HTTP with Worker.ServeHTTP:
//
//	GET /      the worker's line (see serveLingering)
//	GET /slow  "started\n" at once, then, once the worker is retired or told
//	           to finish, a moment later, the worker's line: a request in
//	           flight across the end of the worker's service
//
// The server has no IdleTimeout: an idle keep-alive connection stays open
// until the server closes it.
func httpWorker(w *ipcluster.Worker) error {
	line := func(r *http.Request) string {
		return fmt.Sprintf("slot=%d pid=%d gen=%d remote=%s\n", w.Slot(), os.Getpid(), w.Generation(), r.RemoteAddr)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /", func(rw http.ResponseWriter, r *http.Request) { io.WriteString(rw, line(r)) })
	mux.HandleFunc("GET /slow", func(rw http.ResponseWriter, r *http.Request) {
		io.WriteString(rw, "started\n")
		rw.(http.Flusher).Flush()
		select {
		case <-w.Retired():
		case <-w.Context().Done():
		case <-time.After(time.Minute):
		}
		time.Sleep(200 * time.Millisecond)
		io.WriteString(rw, line(r))
	})
	return w.ServeHTTP(&http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second})
}

// httpClientConn is one HTTP/1.1 connection, kept alive between requests.
type httpClientConn struct {
	net.Conn
	r *bufio.Reader
}

func dialHTTP(t *testing.T, ns *netlab.NS, src netip.Addr, dst netip.AddrPort) *httpClientConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := ns.Dial(ctx, "tcp", src, dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &httpClientConn{Conn: conn, r: bufio.NewReader(conn)}
}

// get sends a GET and returns the response, whose body the caller reads.
func (c *httpClientConn) get(t *testing.T, path string) *http.Response {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", path, resp.Status)
	}
	return resp
}

// A worker serving with ServeHTTP, once retired or told to finish, closes an
// idle keep-alive connection at once, answers the request in flight in
// full, and exits: long before DrainTimeout or StopTimeout would end it.
func TestServeHTTPEndsIdleKeepAlive(t *testing.T) {
	for _, end := range []string{"retired", "stopped"} {
		t.Run(end, func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 2})
			cfg := specConfig{Workers: 1, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
				DrainTimeout: 10 * time.Minute, StopTimeout: 2 * time.Minute}
			c := startScenario(t, lab, cfg, "http")
			c.waitReady()
			dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)

			idle := dialHTTP(t, lab.Client, lab.ClientAddrs4[0], dst)
			resp := idle.get(t, "/")
			b, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			rep, err := parseReply(string(b))
			if err != nil {
				t.Fatal(err)
			}
			slow := dialHTTP(t, lab.Client, lab.ClientAddrs4[1], dst)
			body := bufio.NewReader(slow.get(t, "/slow").Body)
			if l, err := body.ReadString('\n'); err != nil || l != "started\n" {
				t.Fatalf("/slow began with %q, %v", l, err)
			}

			stopped := make(chan error, 1)
			t0 := time.Now()
			if end == "retired" {
				// SIGUSR1: the worker asks to be replaced.
				if err := syscall.Kill(rep.PID, syscall.SIGUSR1); err != nil {
					t.Fatal(err)
				}
			} else {
				go func() { stopped <- c.stop() }()
			}

			// The request in flight is answered in full...
			rest, err := io.ReadAll(body)
			if err != nil {
				t.Fatalf("/slow after the worker was %s: %v (read %q)", end, err, rest)
			}
			if r, err := parseReply(string(rest)); err != nil || r.PID != rep.PID {
				t.Errorf("/slow ended with %q (%v), want the line of worker %d", rest, err, rep.PID)
			}
			// ...and the idle connection is closed by the server, not
			// left to the DrainTimeout.
			_ = idle.SetReadDeadline(time.Now().Add(20 * time.Second))
			if n, err := idle.r.Read(make([]byte, 1)); err != io.EOF {
				t.Errorf("idle keep-alive connection: read %d bytes, %v; want EOF, the server closing it", n, err)
			}
			waitGone(t, []int{rep.PID}, 20*time.Second)
			t.Logf("worker %d %s with an idle keep-alive connection and a request in flight: exited %s later (DrainTimeout %s, StopTimeout %s)",
				rep.PID, end, time.Since(t0).Round(time.Millisecond), cfg.DrainTimeout, cfg.StopTimeout)
			if end == "stopped" {
				select {
				case err := <-stopped:
					if err != nil {
						t.Errorf("master: %v", err)
					}
				case <-time.After(30 * time.Second):
					t.Error("master still running 30s after SIGTERM")
				}
			} else if log := c.log(); strings.Contains(log, "worker exiting with connections still open") {
				t.Errorf("retired worker did not drain:\n%s", log)
			}
		})
	}
}
