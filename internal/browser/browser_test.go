//go:build linux

package browser

import (
	"fmt"
	"image/png"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

// whoami serves, in the lab's server namespace, a page whose body is the
// client's address as the server sees it, and /whoami with the same as
// text; it records every request's client address by the "b" query
// parameter the browsers send.
type whoami struct {
	url string
	mu  sync.Mutex
	by  map[string][]string // ?b= -> remote addresses seen
}

func serveWhoami(t *testing.T, lab *netlab.Lab) *whoami {
	t.Helper()
	ln, err := lab.Server.Listen("tcp", netip.AddrPortFrom(lab.ServerAddr4, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	w := &whoami{url: "http://" + ln.Addr().String(), by: map[string][]string{}}
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		w.mu.Lock()
		w.by[r.URL.Query().Get("b")] = append(w.by[r.URL.Query().Get("b")], host)
		w.mu.Unlock()
		if r.URL.Path == "/whoami" {
			fmt.Fprint(rw, host)
			return
		}
		rw.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(rw, "<!doctype html><title>whoami</title><body style=\"background:#3a6\"><p id=\"addr\">%s</p>", host)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return w
}

func (w *whoami) seen(b string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.by[b]...)
}

// Two browsers at once in one lab, each from its own client address: the
// server sees each one's address on every request, the page's load and
// its script's fetch alike; Eval awaits a promise and reports a rejected
// one; Screenshot writes a PNG of the window's size.
func TestBrowserSourceAddress(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	srv := serveWhoami(t, lab)

	srcs := []netip.Addr{lab.ClientAddrs4[1], lab.ClientAddrs4[2]}
	var browsers []*Browser
	for _, src := range srcs {
		browsers = append(browsers, Start(t, lab, Options{Src: src, Width: 640, Height: 480}))
	}

	for i, b := range browsers {
		tag := fmt.Sprint(i)
		if err := b.Navigate(srv.url + "/?b=" + tag); err != nil {
			t.Fatal(err)
		}
		var shown string
		if err := b.Eval(`document.getElementById("addr").textContent`, &shown); err != nil {
			t.Fatal(err)
		}
		var fetched string
		if err := b.Eval(`fetch("/whoami?b=`+tag+`").then(r => r.text())`, &fetched); err != nil {
			t.Fatal(err)
		}
		want := srcs[i].String()
		if shown != want || fetched != want {
			t.Errorf("browser %d from %v: the server saw the page's load from %s and its fetch from %s", i, srcs[i], shown, fetched)
		}
		seen := srv.seen(tag)
		if len(seen) < 2 {
			t.Errorf("browser %d: the server saw %d requests (%v), want the page and the fetch at least", i, len(seen), seen)
		}
		for _, a := range seen {
			if a != want {
				t.Errorf("browser %d from %v: a request came from %s", i, srcs[i], a)
			}
		}
	}

	b := browsers[0]
	var n struct{ A, B int }
	if err := b.Eval(`new Promise(r => setTimeout(() => r({A: 1, B: 2}), 50))`, &n); err != nil || n.A != 1 || n.B != 2 {
		t.Errorf("Eval of a promise: %+v, %v; want {1 2}", n, err)
	}
	if err := b.Eval(`undefined`, &n); err != nil {
		t.Errorf("Eval of undefined: %v", err)
	}
	if err := b.Eval(`Promise.reject(new Error("no such thing"))`, nil); err == nil || !strings.Contains(err.Error(), "no such thing") {
		t.Errorf("Eval of a rejected promise: %v, want an error naming it", err)
	}
	if err := b.Eval(`nosuchvariable.x`, nil); err == nil || !strings.Contains(err.Error(), "nosuchvariable") {
		t.Errorf("Eval of a throwing expression: %v, want an error naming it", err)
	}

	path := filepath.Join(t.TempDir(), "page.png")
	if err := b.Screenshot(path); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if s := img.Bounds().Size(); s.X < 100 || s.Y < 100 || s.X > 640 || s.Y > 480 {
		t.Errorf("screenshot is %v, want the viewport of a 640x480 window", s)
	}
	// The page's background, not a blank screen.
	if r, g, bl, _ := img.At(img.Bounds().Dx()/2, img.Bounds().Dy()-5).RGBA(); r>>8 != 0x33 || g>>8 != 0xaa || bl>>8 != 0x66 {
		t.Errorf("screenshot's pixel is %02x%02x%02x, want the page's background 33aa66", r>>8, g>>8, bl>>8)
	}

	// A Chromium that dies is an error naming it, not a hang.
	if err := syscall.Kill(browsers[1].pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := browsers[1].Eval(`1`, nil); err == nil {
		t.Errorf("Eval in a killed Chromium succeeded")
	} else {
		t.Logf("Eval in a killed Chromium: %.300s", err)
	}

	for _, b := range browsers {
		if err := b.Close(); err != nil {
			t.Error(err)
		}
		if err := b.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if err := b.Navigate(srv.url); err == nil {
			t.Errorf("Navigate after Close succeeded")
		}
	}
}

// A bad option fails before anything is started or touched; a Chromium
// that does not start fails Start.
func TestBrowserBadOptions(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 2})
	for _, o := range []Options{
		{},
		{Src: netip.MustParseAddr("127.0.0.1")},
		{Src: lab.ClientAddrs4[0], Width: -1},
	} {
		if _, err := start(t, lab, "/nonexistent/chromium", o); err == nil || !strings.Contains(err.Error(), "Options.") {
			t.Errorf("start(%+v): %v, want an error naming the option", o, err)
		}
	}
	// A browser that cannot start is an error naming it, from the driver.
	_, err := start(t, lab, "/nonexistent/chromium", Options{Src: lab.ClientAddrs4[1]})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/chromium") {
		t.Errorf("start with no Chromium: %v, want an error naming it", err)
	}
}
