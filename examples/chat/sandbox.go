//go:build linux

package main

// The -sandbox mode: the chat in a throwaway pair of network namespaces,
// with a self-signed certificate made for it; two clients of different
// slots talk to show the fan-out; then two addresses on this machine's
// loopback to open in a browser, each bridged into the lab from its own
// lab address (so the two windows are clients of two different slots),
// and commands to try. Demo scaffolding: the parts to copy are the other
// files. internal/sandbox builds the lab and starts the master (this
// binary again, without -sandbox) inside it.
//
// The bridges are the one thing that listens in the machine's own
// namespace: on 127.0.0.1 and 127.0.0.2 only, relaying bytes (TLS
// included, end to end) between your browser and the lab, where the
// worker sees the lab address the bridge dialled from.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/coder/websocket"

	"github.com/ipcluster/ipcluster/internal/netlab"
	sbx "github.com/ipcluster/ipcluster/internal/sandbox"
)

var sandbox = flag.Bool("sandbox", false, "run the example in a throwaway network namespace and demo it (needs root)")

// The loopback addresses the bridges listen on, and the lab client
// address each dials from: 198.18.1.1 and 198.18.1.2 differ in their low
// bit, so they are in different slots for any worker count above 1.
var bridges = []struct{ listen, from int }{{1, 1}, {2, 2}}

func runSandbox(workers int, port uint) int {
	dir, err := os.MkdirTemp("", "chat-sandbox-tls-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "chat: make a directory for the sandbox's certificate:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	// The lab's server address is netlab's 198.18.0.1; the bridges'
	// are 127.0.0.1 and 127.0.0.2.
	certFile, keyFile, err := writeSelfSigned(dir, "chat sandbox", []string{"localhost", "127.0.0.1", "127.0.0.2", "198.18.0.1", "fd00::1"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "chat: make the sandbox's certificate:", err)
		return 1
	}
	for name, v := range map[string]string{"cert": certFile, "key": keyFile} {
		if err := flag.Set(name, v); err != nil {
			fmt.Fprintln(os.Stderr, "chat:", err)
			return 1
		}
	}
	return sbx.Run(16, func(ctx context.Context, cl *sbx.Cluster) error {
		return show(ctx, cl, workers, uint16(port), certFile)
	})
}

func show(ctx context.Context, cl *sbx.Cluster, workers int, port uint16, certFile string) error {
	pem, err := os.ReadFile(certFile)
	if err != nil {
		return fmt.Errorf("read the sandbox's certificate: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	server := netip.AddrPortFrom(cl.Lab.ServerAddr4, port)
	base := "https://" + server.String()
	if err := waitReady(ctx, cl, roots, base); err != nil {
		return err
	}
	if err := demo(ctx, cl.Lab, roots, base, workers); err != nil {
		return err
	}
	urls := startBridges(ctx, cl.Lab, server)
	printCommands(cl, base, urls, certFile)
	return nil
}

// client is an HTTPS client in the lab's client namespace, connecting from
// src and trusting the sandbox's certificate.
func client(lab *netlab.Lab, roots *x509.CertPool, src netip.Addr) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: roots},
			ForceAttemptHTTP2: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				dst, err := netip.ParseAddrPort(addr)
				if err != nil {
					return nil, err
				}
				return lab.Client.Dial(ctx, "tcp4", src, dst)
			},
		},
	}
}

type whoami struct {
	WorkerInfo
	Remote string `json:"remote"`
	Proto  string `json:"proto"`
}

func getWhoami(c *http.Client, base string) (whoami, error) {
	var w whoami
	resp, err := c.Get(base + "/whoami")
	if err != nil {
		return w, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return w, fmt.Errorf("GET /whoami: %s", resp.Status)
	}
	return w, json.NewDecoder(resp.Body).Decode(&w)
}

// waitReady polls /whoami until a worker answers: the master installs its
// rules once every slot is ready.
func waitReady(ctx context.Context, cl *sbx.Cluster, roots *x509.CertPool, base string) error {
	c := client(cl.Lab, roots, cl.Lab.ClientAddrs4[0])
	c.Timeout = time.Second
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := getWhoami(c, base)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for the cluster to answer on %s: %w", base, err)
		}
		select {
		case <-ctx.Done():
			return errors.New("interrupted while waiting for the cluster to answer")
		case <-cl.Done:
			return fmt.Errorf("master exited before the cluster answered: %v", cl.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// demo has two clients of different slots join #lobby over WebSocket, and
// each say hello; each must hear the other.
func demo(ctx context.Context, lab *netlab.Lab, roots *x509.CertPool, base string, workers int) error {
	fmt.Printf("\n%d workers serve %s (TLS, HTTP/2) in namespace %s; clients connect from namespace %s.\n"+
		"Two clients of different slots join #lobby over WebSocket and say hello:\n\n", workers, base, lab.Server.Name, lab.Client.Name)
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	type peer struct {
		src  netip.Addr
		nick string
		c    *websocket.Conn
		who  frame
	}
	peers := []*peer{{src: lab.ClientAddrs4[1], nick: "ann"}, {src: lab.ClientAddrs4[2], nick: "bob"}}
	for _, p := range peers {
		c, _, err := websocket.Dial(ctx, "wss"+base[len("https"):]+"/ws", &websocket.DialOptions{HTTPClient: client(lab, roots, p.src)})
		if err != nil {
			return fmt.Errorf("open a WebSocket from %s: %w", p.src, err)
		}
		defer c.CloseNow()
		p.c = c
		if err := writeJSON(ctx, c, hello{Nick: p.nick}); err != nil {
			return err
		}
		if err := readJSON(ctx, c, &p.who); err != nil || p.who.T != "welcome" {
			return fmt.Errorf("no welcome for %s: %v", p.nick, err)
		}
	}
	for _, p := range peers {
		if err := writeJSON(ctx, p.c, clientFrame{T: "say", Room: "lobby", Text: "hello from " + p.src.String(), ID: "m1"}); err != nil {
			return err
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tNICK\tWORKER\tHEARD")
	for _, p := range peers {
		heard := map[string]bool{}
		for len(heard) < len(peers) {
			var f frame
			if err := readJSON(ctx, p.c, &f); err != nil {
				return fmt.Errorf("%s waiting for messages: %w", p.nick, err)
			}
			if f.T == "msg" {
				heard[fmt.Sprintf("%s (slot %d)", f.Msg.Nick, f.Msg.Slot)] = true
			}
		}
		var list []string
		for k := range heard {
			list = append(list, k)
		}
		fmt.Fprintf(tw, "%s\t%s\tslot %d pid %d\t%v\n", p.src, p.nick, p.who.Slot, p.who.PID, list)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("print demo table: %w", err)
	}
	for _, p := range peers {
		_ = p.c.Close(websocket.StatusNormalClosure, "")
	}
	fmt.Println("\nTheir sessions stay on their own workers; only the messages cross, through the master's NATS.")
	return nil
}

// startBridges listens on 127.0.0.N:port of this machine for each bridge
// and relays every connection into the lab from its client address, until
// ctx is done. It returns the URLs it listens on.
func startBridges(ctx context.Context, lab *netlab.Lab, server netip.AddrPort) []string {
	var urls []string
	for _, b := range bridges {
		addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, byte(b.listen)}), server.Port())
		ln, err := net.Listen("tcp4", addr.String())
		if err != nil {
			fmt.Printf("\n(no browser bridge on %s: %v; give -port another port)\n", addr, err)
			continue
		}
		context.AfterFunc(ctx, func() { ln.Close() })
		src := lab.ClientAddrs4[b.from]
		go bridge(ctx, ln, lab, src, server)
		urls = append(urls, fmt.Sprintf("https://%s/   (your browser is %s in the lab)", addr, src))
	}
	return urls
}

func bridge(ctx context.Context, ln net.Listener, lab *netlab.Lab, src netip.Addr, server netip.AddrPort) {
	for {
		in, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer in.Close()
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			out, err := lab.Client.Dial(dctx, "tcp4", src, server)
			cancel()
			if err != nil {
				return
			}
			defer out.Close()
			var wg sync.WaitGroup
			wg.Add(2)
			relay := func(dst, src net.Conn) {
				defer wg.Done()
				_, _ = io.Copy(dst, src)
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
			}
			go relay(out, in)
			go relay(in, out)
			wg.Wait()
		}()
	}
}

func printCommands(cl *sbx.Cluster, base string, urls []string, certFile string) {
	name := flag.Lookup("name").Value.String()
	ctl := "go run ./cmd/ipclusterctl -name " + name + " -rundir " + cl.RunDir
	if len(urls) > 0 {
		fmt.Printf("\nOpen these in two browser windows (the certificate is the sandbox's own, self-signed:\n"+
			"accept it, or import %s), pick a nickname in each, and chat:\n\n", certFile)
		for _, u := range urls {
			fmt.Printf("  %s\n", u)
		}
	}
	fmt.Printf("\nThen, as root in another terminal, while they chat:\n\n")
	for _, c := range [][2]string{
		{"deploy the binary on disk: each window reconnects once, to its slot's new worker, session intact", "kill -HUP " + strconv.Itoa(cl.PID)},
		{"retire one slot's worker: its window moves, the other stays", ctl + " retire 1"},
		{"crash a worker: the master replaces it; the window re-creates its session from what it remembers", ctl + " status   # then kill -9 a worker's pid"},
		{"renew the certificate in place: the workers load it at the next handshake, no restart", "cp " + certFile + " " + certFile + ".new && mv " + certFile + ".new " + certFile + "   # (or write a new pair there)"},
		{"what the cluster says", ctl + " status"},
		{"a client in the lab, from the command line", fmt.Sprintf("ip netns exec %s curl -sk --interface %s %s/whoami", cl.Lab.Client.Name, cl.Lab.ClientAddrs4[3], base)},
	} {
		fmt.Printf("  # %s\n  %s\n", c[0], c[1])
	}
	fmt.Printf("\nPress Ctrl-C to stop the cluster and remove the namespaces.\n")
}
