// Command ipclusterctl shows and steers a running ipcluster cluster through
// its master's control socket: status, deploy, restart, retire, resize,
// kill-retired, stop. Run it as the master's user (or root):
//
//	ipclusterctl -rundir /run/ipcluster -name chat status
//	ipclusterctl -name chat deploy
//
// It exits 0 on success, 1 when the command failed (a deploy rolled back),
// and 2 on bad usage or when no master can be reached.
package main

import (
	"os"

	"github.com/ipcluster/ipcluster/internal/ctl"
)

func main() { os.Exit(ctl.Main(os.Args[1:], os.Stdout, os.Stderr)) }
