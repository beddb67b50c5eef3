package bgpreg_test

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/ipcluster/ipcluster"
)

// A program that did not import package bgp has no speaker: a Config with
// BGP peers is refused before anything starts, naming the import.
func TestNoSpeakerNamesTheImport(t *testing.T) {
	cfg := ipcluster.Config{Name: "t", Workers: 2, Ports: []ipcluster.Port{{Public: 7000}}, Addr: netip.MustParseAddr("198.19.100.1"),
		BGP: ipcluster.BGPConfig{ASN: 65001, RouterID: netip.MustParseAddr("198.18.16.2"),
			Peers: []ipcluster.BGPPeer{{Addr: netip.MustParseAddr("198.18.16.1"), ASN: 65000}}}}
	err := cfg.Validate()
	if !errors.Is(err, ipcluster.ErrInvalidConfig) || !strings.Contains(err.Error(), `import _ "github.com/ipcluster/ipcluster/bgp"`) {
		t.Fatalf("Validate = %v, want the missing import named", err)
	}
}
