-- drh-pacs: forward every stable study to the drh-pacs DICOM node, automatically.
--
-- Orthanc calls OnStableStudy once a study has received no new instance for "StableAge" seconds
-- (orthanc.json). The study is sent with a synchronous C-STORE job to the modality named in
-- "DrhPacs" > "Modality" (declared in "DicomModalities"); drh-pacs answers each C-STORE only once
-- the file is safely on its spool, so a success here means drh-pacs has it.
--
-- A study that could not be sent after "DrhPacs" > "Attempts" tries is reported in Orthanc's log;
-- `drh-pacs backfill orthanc` indexes every study drh-pacs does not have yet, so an outage of
-- drh-pacs never loses a study. Logs carry Orthanc identifiers only
-- (hashes), never patient data.

local function DrhSettings()
  local config = GetOrthancConfiguration()
  local drh = config['DrhPacs'] or {}
  return drh['Modality'] or 'DRHPACS', tonumber(drh['Attempts'] or 3)
end

function OnStableStudy(studyId, tags, metadata)
  local modality, attempts = DrhSettings()
  local body = '{"Resources":["' .. studyId .. '"],"Synchronous":true}'
  local lastError = ''
  for attempt = 1, attempts do
    local ok, err = pcall(RestApiPost, '/modalities/' .. modality .. '/store', body, true)
    if ok then
      print('drh-pacs: study ' .. studyId .. ' forwarded to ' .. modality .. ' (attempt ' .. attempt .. ')')
      return
    end
    lastError = tostring(err)
  end
  print('drh-pacs: study ' .. studyId .. ' NOT forwarded to ' .. modality .. ' after ' .. attempts ..
        ' attempt(s): ' .. lastError .. ' -- run "drh-pacs backfill orthanc" to catch up')
end
