-- WNoDeS's job_submit/lua filter for Slurm 22.05 (docs/slurm.md): every batch job's script is
-- replaced by a wrapper that hands the original script, unchanged, to the WNoDeS job starter,
-- which runs it inside a WNoDeS VM and exits with its exit code (so `sacct` shows the payload's).
--
-- Install: copy to the directory of slurm.conf as job_submit.lua, replacing @JOB_STARTER@ with
-- the job starter's path (slurm/wnodes-slurm-job-starter) and @STARTER_CONF@ with its settings
-- file; set `JobSubmitPlugins=lua` in slurm.conf. scripts/slurm-cluster.sh does both.
--
-- Jobs without a batch script (salloc, srun outside a batch job) are left alone.

local job_starter = "@JOB_STARTER@"
local starter_conf = "@STARTER_CONF@"

-- A here-document delimiter that is no line of the script.
local function delimiter(script)
   local delim = "WNODES_PAYLOAD_EOF"
   while true do
      local clash = false
      for line in (script .. "\n"):gmatch("([^\n]*)\n") do
         if line == delim then
            clash = true
            break
         end
      end
      if not clash then
         return delim
      end
      delim = delim .. "_"
   end
end

-- Single-quoted for sh.
local function sh_quote(s)
   return "'" .. s:gsub("'", "'\\''") .. "'"
end

function slurm_job_submit(job_desc, part_list, submit_uid)
   local script = job_desc.script
   if script == nil or script == "" then
      return slurm.SUCCESS
   end
   if script:sub(-1) ~= "\n" then
      script = script .. "\n"
   end
   local delim = delimiter(script)
   job_desc.script = "#!/bin/sh\n"
      .. "# Wrapped by WNoDeS's job_submit.lua: the original script (below) runs in a WNoDeS VM.\n"
      .. "exec " .. sh_quote(job_starter) .. " --conf " .. sh_quote(starter_conf)
      .. " <<'" .. delim .. "'\n"
      .. script
      .. delim .. "\n"
   slurm.log_info("wnodes: job from uid %u: script wrapped for the WNoDeS job starter", submit_uid)
   return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return slurm.SUCCESS
end

slurm.log_info("wnodes: job_submit.lua loaded (job starter %s)", job_starter)
return slurm.SUCCESS
