//go:build linux

package netlab

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Tool returns the path of the first of names found on PATH, for a test
// that runs that program (alternative names first to last, e.g. "chromium",
// "chromium-browser"). When none is installed it skips the test, naming pkg,
// the Debian package that provides it; with IPCLUSTER_REQUIRE_TOOLS=1 in
// the environment it fails the test instead.
func Tool(t testing.TB, pkg string, names ...string) string {
	t.Helper()
	for _, name := range names {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	msg := strings.Join(names, " or ") + " not found on PATH: install the Debian package " + pkg +
		" (apt-get install " + pkg + "; sudo ./test.sh installs every package the tests use)"
	if os.Getenv(requireToolsEnv) == "1" {
		t.Fatal(msg + " (and " + requireToolsEnv + "=1 is set)")
	}
	t.Skip(msg + "; skipping")
	return ""
}
