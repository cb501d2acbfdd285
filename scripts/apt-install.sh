# apt_install WHO PACKAGE...: the Debian packages not yet installed, installed (scripts/setup.sh, scripts/image.sh).
# Packages must not start services (nginx would listen on port 80 of the machine; the benchmark runs its own in
# a lab pod): policy-rc.d is Debian's switch for that, in place for the install only.
apt_install() {
  local who=$1 package missing=() created_policy_rc=0
  shift
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "$who: installing ${missing[*]}"
  apt-get update -qq
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && created_policy_rc=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ "$created_policy_rc" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
