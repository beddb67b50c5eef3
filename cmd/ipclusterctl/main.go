// Command ipclusterctl shows and steers a running ipcluster cluster through
// its master's control socket: status, deploy, restart, retire, resize,
// kill-retired, stop. Run it as the master's user (or root):
//
//	ipclusterctl -rundir /run/ipcluster -name chat status
//	ipclusterctl -name chat deploy
//
// It exits 0 on success, and with a status of its own for each kind of
// failure: 2 bad usage, 3 no master, 4 permission denied, 5 a request the
// master refused, 6 a deploy or restart rolled back, 7 a deploy whose new
// master failed (its error is printed), 8 gave up waiting, 1 anything else.
// `ipclusterctl -h` lists them.
package main

import (
	"os"

	"github.com/ipcluster/ipcluster/internal/ctl"
)

func main() { os.Exit(ctl.Main(os.Args[1:], os.Stdout, os.Stderr)) }
