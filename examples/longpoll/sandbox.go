//go:build linux

package main

// The -sandbox mode: run the chat in a throwaway pair of network namespaces,
// show a few clients' sessions sticking to their workers, and print curl
// commands to try. Demo scaffolding; the parts to copy are main.go,
// chat.go and index.html. internal/sandbox builds the lab and starts the
// master (this binary again, without -sandbox) inside it.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/netip"
	"net/url"
	"os"
	"text/tabwriter"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	sbx "github.com/ipcluster/ipcluster/internal/sandbox"
)

var sandbox = flag.Bool("sandbox", false, "run the example in a throwaway network namespace and demo it (needs root)")

const (
	readyTimeout = 10 * time.Second
	demoClients  = 6
)

func runSandbox(workers int, port uint) int {
	return sbx.Run(16, func(ctx context.Context, cl *sbx.Cluster) error { return show(ctx, cl, workers, port) })
}

// show demonstrates the running cluster, then says what to try.
func show(ctx context.Context, cl *sbx.Cluster, workers int, port uint) error {
	base := "http://" + netip.AddrPortFrom(cl.Lab.ServerAddr4, uint16(port)).String()
	if err := waitReady(ctx, cl, base); err != nil {
		return err
	}
	if err := demo(cl.Lab, base, workers); err != nil {
		return err
	}
	printCommands(cl, base, port)
	return nil
}

// client is an HTTP client in the lab's client namespace, connecting from
// src, with its own cookie jar. Keep-alive is off: every request is a new
// connection, routed afresh.
func client(lab *netlab.Lab, src netip.Addr) *http.Client {
	jar, _ := cookiejar.New(nil)
	return &http.Client{
		Jar:     jar,
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
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

// call does one request and decodes its JSON answer into v.
func call(c *http.Client, method, u string, v any) error {
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s", method, u, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// waitReady polls /whoami until a worker answers: the master installs its
// rules once every slot is ready, so the first answer means the cluster
// is up.
func waitReady(ctx context.Context, cl *sbx.Cluster, base string) error {
	c := client(cl.Lab, cl.Lab.ClientAddrs4[0])
	c.Timeout = time.Second
	deadline := time.Now().Add(readyTimeout)
	for {
		var who whoamiReply
		err := call(c, http.MethodGet, base+"/whoami", &who)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for the cluster to answer on %s (%s): %w", base, readyTimeout, err)
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

// demo has a few client addresses join, say hello and ask /whoami on new
// connections, and prints where their sessions live.
func demo(lab *netlab.Lab, base string, workers int) error {
	fmt.Printf("\n%d workers serve %s in namespace %s; clients connect from namespace %s.\n"+
		"Each client joins #lobby, sends a message, then asks /whoami on a new connection:\n\n",
		workers, base, lab.Server.Name, lab.Client.Name)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tNICK\tJOINED ON\tWHOAMI ON\tSESSION SEEN\tUNREAD")
	for i, src := range lab.ClientAddrs4[:min(demoClients, len(lab.ClientAddrs4))] {
		c := client(lab, src)
		nick := fmt.Sprintf("user%d", i)
		var joined, who whoamiReply
		if err := call(c, http.MethodPost, base+"/join?"+url.Values{"nick": {nick}, "room": {"lobby"}}.Encode(), &joined); err != nil {
			return err
		}
		var m message
		if err := call(c, http.MethodPost, base+"/send?"+url.Values{"text": {"hello from " + src.String()}}.Encode(), &m); err != nil {
			return err
		}
		if err := call(c, http.MethodGet, base+"/whoami", &who); err != nil {
			return err
		}
		seen, unread := "no", "-"
		if who.Session != nil && who.Session.Nick == nick {
			seen, unread = "yes", fmt.Sprint(who.Session.Unread)
		}
		fmt.Fprintf(tw, "%s\t%s\tslot %d pid %d\tslot %d pid %d\t%s\t%s\n",
			src, nick, joined.Slot, joined.PID, who.Slot, who.PID, seen, unread)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("print demo table: %w", err)
	}
	fmt.Println("\nEvery client's second connection reached the worker holding its session;")
	fmt.Println("clients of the same slot share a room (their unread counts include each other).")
	return nil
}

func printCommands(cl *sbx.Cluster, base string, port uint) {
	lab := cl.Lab
	cli, srv := lab.Client.Name, lab.Server.Name
	a, b := lab.ClientAddrs4[9], lab.ClientAddrs4[13] // same low bits for 2, 4 or 8 workers (9 = 0b1001, 13 = 0b1101): same slot
	curl := func(src netip.Addr, jar string) string {
		return fmt.Sprintf("ip netns exec %s curl -s --interface %s -b /tmp/%s.jar -c /tmp/%s.jar", cli, src, jar, jar)
	}
	name := flag.Lookup("name").Value.String()
	fmt.Printf("\nTry it, as root in other terminals (ann and bob share a slot, so a room):\n\n")
	for _, c := range [][2]string{
		{"ann joins, then bob", fmt.Sprintf("%s -X POST '%s/join?nick=ann&room=lobby'", curl(a, "ann"), base)},
		{"", fmt.Sprintf("%s -X POST '%s/join?nick=bob&room=lobby'", curl(b, "bob"), base)},
		{"ann's SSE stream: leave it open", fmt.Sprintf("%s -N %s/events", curl(a, "ann"), base)},
		{"bob says hi; ann's stream shows it", fmt.Sprintf("%s -X POST %s/send --data-urlencode text=hi", curl(b, "bob"), base)},
		{"bob long-polls: waits up to 25s for news", fmt.Sprintf("%s '%s/poll?cursor=0'", curl(b, "bob"), base)},
		{"slot, worker pid and version, session", fmt.Sprintf("%s %s/whoami", curl(a, "ann"), base)},
		{"restart every worker, same build (or: ipclusterctl -name " + name + " -rundir " + cl.RunDir + " restart)", fmt.Sprintf("kill -USR2 %d", cl.PID)},
		{"deploy the binary on disk (or: ipclusterctl -name " + name + " -rundir " + cl.RunDir + " deploy)", fmt.Sprintf("kill -HUP %d", cl.PID)},
		{"connections conntrack pins to a worker", fmt.Sprintf("ip netns exec %s conntrack -L -p tcp --dport %d", srv, port)},
	} {
		if c[0] != "" {
			fmt.Printf("  # %s\n", c[0])
		}
		fmt.Printf("  %s\n", c[1])
	}
	fmt.Printf("\nAfter the restart ann's open stream goes on from the old worker (its ticks say retired=true)\n" +
		"until it is closed; her next requests reach the new worker, which re-joins her from the cookie.\n")
	fmt.Printf("\nPress Ctrl-C to stop the cluster and remove the namespaces.\n")
}
