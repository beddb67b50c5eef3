module github.com/ipcluster/ipcluster

go 1.24.0

require (
	github.com/coreos/go-iptables v0.8.0 // indirect
	github.com/vishvananda/netlink v1.3.1 // indirect
	github.com/vishvananda/netns v0.0.5 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
