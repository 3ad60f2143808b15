"""Filter for the pre-flight: the variable names a role read before wecom.dify 1.0, and what
to set instead (wecom.dify.wecom_legacy_names).

Before 1.0 the roles were docker, nginx, dify and bridge with variables docker_*, nginx_*, dify_*
and bridge_*, names other roles (geerlingguy.nginx, geerlingguy.docker) read too. Each role's
assert.yml passes the names defined for the host, and the filter returns one sentence per old name
it finds, so the play fails naming the new variable instead of silently ignoring the old one.
"""


def wecom_legacy_names(defined, old_prefix, new_prefix, options, exceptions=None, ignored=()):
    """Sentences for each name in `defined` that is an old name of one of `options`.

    defined:    variable names set for the host (the varnames lookup)
    old_prefix: the role's prefix before 1.0, e.g. nginx_
    new_prefix: its prefix now, e.g. wecom_edge_
    options:    the role's current variable names (its argument spec)
    exceptions: old name -> sentence ending, for names that did not just change prefix
    ignored:    old names that are meant for another role (e.g. geerlingguy.nginx) and left alone
    """
    exceptions = dict(exceptions or {})
    old_names = {
        old_prefix + name[len(new_prefix) :]: name
        for name in options
        if name.startswith(new_prefix)
    }
    found = []
    for name in sorted(set(defined)):
        if name in ignored or not name.startswith(old_prefix):
            continue
        if name in exceptions:
            found.append(f"{name} {exceptions[name]}.")
        elif name in old_names:
            found.append(f"{name} is now {old_names[name]}.")
    return found


class FilterModule:
    def filters(self):
        return {"wecom_legacy_names": wecom_legacy_names}
